"""Out-of-fold predictions: a set of fold runs (``train --folds K --fold k``, one per fold, or several per fold for
an ensemble) gathered into one table of every image, each predicted by the run(s) that never trained on it.

Their figures are honest: no image is scored by a model that saw it, so anything chosen on the table (a threshold,
an ensemble's weights) is chosen on images that no fold model trained on. The cell-level weights are cross-tuned on
images with true cells instead (`hpa_nb.cells.compare`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from hpa_nb.core.labels import label_matrix
from hpa_nb.core.metrics import image_metrics
from hpa_nb.data.competition import load_labels
from hpa_nb.training import run
from hpa_nb.training.inputs import run_data
from hpa_nb.training.predictions import read_predictions, reorder, write_predictions

logger = logging.getLogger(__name__)


@dataclass
class OutOfFold:
    """The gathered predictions and their figures."""

    ids: list[str]
    y_true: np.ndarray  # [images, 19]
    y_score: np.ndarray  # [images, 19], each image by the runs of the fold that held it out, averaged
    runs: pd.DataFrame  # one row per run: fold, backbone, images, macro AUC, mAP on its own held-out images
    metrics: dict = field(repr=False)  # image_metrics of the whole out-of-fold table

    def table(self) -> pd.DataFrame:
        """The runs' rows, then one for the whole out-of-fold table."""
        whole = {
            "run": "out of fold",
            "fold": "all",
            "backbone": "",
            "images": len(self.ids),
            "macro AUC": self.metrics["macro_roc_auc"],
            "mAP": self.metrics["map"],
        }
        return pd.concat([self.runs, pd.DataFrame([whole])], ignore_index=True)

    def write(self, path: str | Path) -> Path:
        """The out-of-fold predictions as a predictions.csv."""
        return write_predictions(path, self.ids, self.y_score)


def gather(run_dirs: Sequence[str | Path], data_dir: str | Path | None = None) -> OutOfFold:
    """The out-of-fold table of `run_dirs`: fold runs of one split (same `folds` and seed, on the same data).

    Runs of the same fold are averaged (an ensemble of backbones or seeds); every fold of the split must be there,
    or the table would silently cover part of the data. Each run's ``oof.csv`` is checked against its split."""
    run_dirs = [Path(folder) for folder in run_dirs]
    if not run_dirs:
        raise ValueError("folds: no runs given")
    configs = [run.load_config(folder) for folder in run_dirs]
    first = configs[0]
    for folder, config in zip(run_dirs, configs):
        if not config.data.folds:
            raise ValueError(f"{folder} is not a fold run (train it with --folds K --fold k)")
        if (config.data.folds, config.data.seed, config.cells.level) != (
            first.data.folds,
            first.data.seed,
            first.cells.level,
        ):
            raise ValueError(
                f"{folder} has folds={config.data.folds}, seed={config.data.seed}, level={config.cells.level}, not "
                f"{first.data.folds}, {first.data.seed}, {first.cells.level} as {run_dirs[0]}: the runs are of other splits"
            )
        if not run.RunFolder(folder).oof.is_file():
            raise FileNotFoundError(f"{run.RunFolder(folder).oof} does not exist: the run did not finish")
    missing = sorted(set(range(first.data.folds)) - {config.data.fold for config in configs})
    if missing:
        raise ValueError(f"folds: no run of fold {missing[0]} of {first.data.folds} among the {len(run_dirs)} given")
    frame = load_labels(Path(data_dir) if data_dir else run_data(run_dirs[0]))
    truth = dict(zip(frame["ID"], frame["Label"]))
    by_fold: dict[int, list[tuple[list[str], np.ndarray]]] = {}
    rows = []
    for folder, config in zip(run_dirs, configs):
        ids, scores = read_predictions(run.RunFolder(folder).oof)
        held = run.load_split(folder)["val"]
        if sorted(ids) != sorted(held):
            raise ValueError(
                f"{run.RunFolder(folder).oof} does not hold the run's held-out images ({len(ids)} rows, "
                f"{len(held)} held out)"
            )
        if by_fold.get(config.data.fold) and sorted(by_fold[config.data.fold][0][0]) != sorted(ids):
            raise ValueError(f"{folder} holds out other images than the other runs of fold {config.data.fold}")
        unknown = [image_id for image_id in ids if image_id not in truth]
        if unknown:
            raise ValueError(f"{folder}: image {unknown[0]} is not in the data's train.csv")
        by_fold.setdefault(config.data.fold, []).append((ids, scores))
        metrics = image_metrics(label_matrix(ids, [truth[i] for i in ids]), scores)
        rows.append(
            {
                "run": str(folder),
                "fold": config.data.fold,
                "backbone": config.model.backbone,
                "images": len(ids),
                "macro AUC": metrics["macro_roc_auc"],
                "mAP": metrics["map"],
            }
        )
    all_ids, blocks = [], []
    for fold in sorted(by_fold):
        ids = by_fold[fold][0][0]
        aligned = [reorder(ids, member_ids, scores)[0] for member_ids, scores in by_fold[fold]]
        all_ids += ids
        blocks.append(np.mean(aligned, axis=0))
    if len(set(all_ids)) != len(all_ids):
        raise ValueError("folds: an image is held out by two folds: the runs are of other splits")
    y_true = label_matrix(all_ids, [truth[i] for i in all_ids])
    y_score = np.concatenate(blocks).astype(np.float32)
    metrics = image_metrics(y_true, y_score)
    logger.info(f"folds: {len(all_ids)} out-of-fold images from {len(run_dirs)} runs of {first.data.folds} folds")
    return OutOfFold(all_ids, y_true, y_score, pd.DataFrame(rows), metrics)
