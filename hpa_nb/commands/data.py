"""`python -m hpa_nb shard` and `tiles`: the compact records training reads."""

from __future__ import annotations

import argparse

from hpa_nb.commands.common import data_dir, segmentation_options
from hpa_nb.data.shards import write_shards
from hpa_nb.data.tiles import write_tiles


def shard(args: argparse.Namespace) -> None:
    manifest = write_shards(
        data_dir(args.src),
        args.out,
        size=args.size,
        channels=args.channels,
        encoding=args.encoding,
        images_per_shard=args.images_per_shard,
        skip_bad=args.skip_bad,
        max_gb=args.max_gb,
    )
    print(f"wrote {manifest['count']} images in {len(manifest['shards'])} shards")


def tiles(args: argparse.Namespace) -> None:
    manifest = write_tiles(
        data_dir(args.src),
        args.out,
        size=args.size,
        channels=args.channels,
        segmentation=args.segmentation,
        images_per_file=args.images_per_file,
        encoding=args.encoding,
        skip_bad=args.skip_bad,
        workers=args.workers,
        **segmentation_options(args),
    )
    print(f"wrote {manifest['count']} cells of {manifest['images']} images in {len(manifest['files'])} files")
