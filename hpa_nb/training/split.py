"""The split of a run: which images (or, for a cell run, which cells) train and which validate, and their labels.
A stratified split by the seed, a fold of K, the split of another run, or the run's own saved split when it
resumes; host 0 writes it into the run folder and every other host reads it there."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from hpa_nb.core.labels import label_matrix, parse_label
from hpa_nb.data import combined, pipeline, shards, tiles
from hpa_nb.data.competition import load_labels
from hpa_nb.data.splits import holdout
from hpa_nb.training import run
from hpa_nb.training.config import TrainConfig

logger = logging.getLogger(__name__)


def image_split(
    root: Path, run_dir: Path, config: TrainConfig, reuse: bool
) -> tuple[list[str], list[str], pd.DataFrame]:
    """The image-level train / validation IDs a run uses, and the labels they come from, without writing anything:
    the saved split when resuming, else `config.data.split_from`'s, else a stratified split by `config.data.seed` (fold
    `config.data.fold` of `config.data.folds` when set), the images of extra data sources on the training side."""
    frame = load_labels(root)
    found = pipeline.shard_folder(root, config.data.channels, config.data.shards)
    if found is not None:  # shards written elsewhere: only the images they hold, and only if they match train.csv
        frame = shards.pair(*found, frame, root)
    ids = frame["ID"].tolist()
    if reuse and run.RunFolder(run_dir).split.is_file():
        saved = run.load_split(run_dir)
    elif config.data.split_from:
        saved = run.load_split(config.data.split_from)
        unknown = sorted(set(saved["train"] + saved["val"]) - set(ids))
        if unknown:
            raise ValueError(f"split_from {config.data.split_from}: image {unknown[0]} is not in {root}/train.csv")
    else:
        train_ids, val_ids = holdout(
            ids,
            label_matrix(ids, frame["Label"]),
            config.data.val_fraction,
            config.data.seed,
            config.data.folds,
            config.data.fold,
            train_only=combined.extra_ids(root),
        )
        saved = {"train": train_ids, "val": val_ids}
    if not saved["train"] or not saved["val"]:
        raise ValueError(f"split of {len(ids)} images in {root} left an empty train or validation subset")
    return list(saved["train"]), list(saved["val"]), frame


def split_run(
    root: Path, run_dir: Path, config: TrainConfig, reuse: bool, writer: bool = True
) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Train / validation IDs (`image_split`, written to the run's split.csv) and their label matrices. Every host
    but the writer reads the split that the writer wrote."""
    if not writer and not run.RunFolder(run_dir).split.is_file():
        raise FileNotFoundError(
            f"{run.RunFolder(run_dir).split}: host 0 wrote it and this host does not see it; the "
            "run folder must be one folder that every host sees (a bucket or NFS share)"
        )
    train_ids, val_ids, frame = image_split(root, run_dir, config, reuse or not writer)
    if writer:
        run.write_split(run_dir, train_ids, val_ids)
    if config.cells.level == "cell":
        return _cell_split(root, config, frame, train_ids, val_ids)
    ids = frame["ID"].tolist()
    matrix = label_matrix(ids, frame["Label"])
    return train_ids, val_ids, _rows(train_ids, ids, matrix), _rows(val_ids, ids, matrix)


def _cell_split(
    root: Path, config: TrainConfig, frame, train_ids: list[str], val_ids: list[str]
) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """The image split carried over to the tiles: every cell of an image on its image's side, with the
    image's label as its weak target. Tiles from other data stop the run; images the tiles lack (skipped
    as bad when they were written) are left out with a warning."""
    where = tiles.manifest_path(config.cells.tiles)
    manifest = tiles.read_manifest(config.cells.tiles)
    if not manifest["complete"]:
        raise ValueError(
            f"{where}: the tiles are incomplete ({manifest['images']} images; their run stopped at "
            "its deadline): run it again to finish them"
        )
    held = tiles.image_labels(manifest)
    truth = dict(zip(frame["ID"], frame["Label"]))
    for image_id, label in held.items():
        if image_id not in truth or not np.array_equal(
            parse_label(label, image_id), parse_label(truth[image_id], image_id)
        ):
            raise ValueError(
                f"{where}: image {image_id} with label '{label}' in the tiles is not so in "
                f"{root}/train.csv: the tiles were written from other data"
            )
    missing = [image_id for image_id in train_ids + val_ids if image_id not in held]
    if missing:
        logger.warning(
            f"warning: {len(missing)} images of the split have no tiles (skipped as bad when the tiles were "
            f"written, e.g. {missing[0]}); training leaves them out"
        )
    keys = {side: tiles.tile_keys(manifest, ids) for side, ids in (("train", train_ids), ("val", val_ids))}
    image_of = {key: key.rpartition("_")[0] for side_keys in keys.values() for key in side_keys}

    def matrix(side_keys: list[str]) -> np.ndarray:
        return label_matrix(side_keys, [held[image_of[key]] for key in side_keys])

    return keys["train"], keys["val"], matrix(keys["train"]), matrix(keys["val"])


def _rows(ids: list[str], all_ids: list[str], matrix: np.ndarray) -> np.ndarray:
    position = {image_id: index for index, image_id in enumerate(all_ids)}
    return matrix[[position[image_id] for image_id in ids]]
