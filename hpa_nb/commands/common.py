"""What several verbs' handlers share: the data folder an option names or discovery finds, and the
segmentation options."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hpa_nb.sample.sources import find_data


def data_dir(value: str | None) -> Path:
    """An explicit --data folder, or the one `hpa_nb.core.env.find_data` discovers (announced)."""
    if value:
        path = Path(value)
        if not path.is_dir():
            raise FileNotFoundError(f"data folder {path} does not exist")
        return path

    source = find_data()
    print(f"data: {source}", file=sys.stderr)
    return source.path


def segmentation_options(args: argparse.Namespace) -> dict:
    if args.segmentation == "hpacellseg" and args.hpacellseg_dir is not None:
        return {"hpacellseg_dir": str(args.hpacellseg_dir)}
    return {}
