"""`python -m hpa_nb bench KIND`: the benchmarks, each over `hpa_nb.bench`."""

from __future__ import annotations

import argparse

from hpa_nb import bench
from hpa_nb.commands.common import data_dir


def _train(args: argparse.Namespace) -> None:
    bench.train(
        data_dir(args.data),
        image_size=args.image_size,
        channels=args.channels,
        backbone=args.backbone,
        batch_size=args.batch_size,
        steps=args.steps,
    )


def _loader(args: argparse.Namespace) -> None:
    folder = None if args.size else data_dir(args.data)
    bench.loader(
        folder,
        image_size=args.image_size,
        channels=args.channels,
        generate_size=args.size,
        images=args.images or 48,
        seconds=args.seconds,
        bit_depth=args.bit_depth,
        rounds=args.rounds,
    )


def _cells(args: argparse.Namespace) -> None:
    bench.cells(images=args.images or 12, size=args.size or 2048, workers=args.workers, rounds=args.rounds)


BENCHES = {
    "loader": _loader,
    "train": _train,
    "cells": _cells,
}  # the kinds `hpa_nb.cli.BENCH_KINDS` offers (a test keeps them equal)


def main(args: argparse.Namespace) -> None:
    BENCHES[args.kind](args)
