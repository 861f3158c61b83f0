"""More than one data source read as one: the competition's folder and extra folders in its layout (for example the
public HPA images as ``train.csv`` plus ``train/{ID}_{colour}.png``), joined in a view folder of links.

The view holds ``train.csv`` (every source's rows, the first source's first) and ``train/`` with one symbolic link
per PNG, so every reader of the competition layout reads it unchanged and nothing is copied. An ID in two sources
stops it in one line that names both files. `extra_ids` gives the images of the extra sources, which a run only
ever trains on (`hpa_nb.data.splits.holdout`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Sequence

import pandas as pd

from hpa_nb.core.files import write_text
from hpa_nb.core.labels import COLORS
from hpa_nb.data.competition import load_labels

logger = logging.getLogger(__name__)

SOURCES_FILE = "sources.csv"  # ID, source folder: which source each image of a view came from


def view_name(folders: Sequence[str | Path]) -> str:
    """The view's folder name: one per list of sources, so two runs with the same sources share it."""
    return "data-" + hashlib.sha256("\n".join(str(Path(f).resolve()) for f in folders).encode()).hexdigest()[:12]


def combine(folders: Sequence[str | Path], out_root: Path) -> Path:
    """The view of `folders` (the first is the competition's) under ``out_root``, made or brought up to date.

    Every image of every source's ``train.csv`` must have its four PNGs in that source's ``train/``; the first
    one missing is named. Returns the view folder."""
    folders = [Path(folder) for folder in folders]
    frames = []
    seen: dict[str, Path] = {}
    for folder in folders:
        frame = load_labels(folder)[["ID", "Label"]]
        for image_id in frame["ID"]:
            if image_id in seen:
                raise ValueError(
                    f"image {image_id} is in both {seen[image_id] / 'train.csv'} and {folder / 'train.csv'}: "
                    "the IDs of data sources must not collide (rename one source's images)"
                )
            seen[image_id] = folder
        frames.append(frame.assign(source=str(folder)))
    view = out_root / view_name(folders)
    (view / "train").mkdir(parents=True, exist_ok=True)
    for image_id, folder in seen.items():
        for color in COLORS:
            target = (folder / "train" / f"{image_id}_{color}.png").resolve()
            link = view / "train" / target.name
            if not target.is_file():
                raise FileNotFoundError(
                    f"image {image_id} of {folder / 'train.csv'}: no {folder / 'train' / target.name}"
                )
            if not link.is_symlink() or os.readlink(link) != str(target):
                link.unlink(missing_ok=True)
                link.symlink_to(target)
    table = pd.concat(frames, ignore_index=True)
    write_text(view / SOURCES_FILE, table[["ID", "source"]].to_csv(index=False))
    write_text(view / "train.csv", table[["ID", "Label"]].to_csv(index=False))  # last: a view with it is whole
    counts = ", ".join(f"{len(frame)} from {folder}" for folder, frame in zip(folders, frames))
    logger.info(f"data: {len(table)} images in {view} ({counts})")
    return view


def extra_ids(view: str | Path) -> list[str]:
    """The images of a view that come from its extra sources (not the first); none for a plain data folder."""
    path = Path(view) / SOURCES_FILE
    if not path.is_file():
        return []
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    return table.loc[table["source"] != table["source"].iloc[0], "ID"].tolist()
