"""`python -m hpa_nb sample`."""

from __future__ import annotations

import argparse

from hpa_nb.sample.writer import write_sample


def main(args: argparse.Namespace) -> None:
    write_sample(
        args.out,
        images=args.images,
        size=args.size,
        seed=args.seed,
        bit_depth=args.bit_depth,
        test_images=args.test_images,
    )
    print(f"wrote sample to {args.out}")
