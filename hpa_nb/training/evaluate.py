"""Held-out evaluation of a training run: predictions.csv, metrics.json, plots and a per-class table.

``--split val`` (the default) scores exactly the images the run held out: the split is
reproduced from the run's saved config (``val_fraction``, ``seed``, ``folds``, ``fold``) and checked against
``RUN/split.csv``. Several runs are scored as their weighted average (an ensemble): on ``val``, only runs that
held out the same images (a fold set's out-of-fold figures come from `hpa_nb.training.folds`). ``--split all`` scores every labelled image of a data folder, for a separate
labelled test set. Per-class F1 thresholds are tuned on the evaluated images themselves (see
`hpa_nb.core.metrics.image_metrics`), so that F1 is optimistic; AUC and AP need no threshold. For a
separate test folder, pass the thresholds of a validation evaluation (``--thresholds``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from hpa_nb.core.files import write_text
from hpa_nb.core.labels import LABEL_NAMES, label_matrix
from hpa_nb.core.metrics import image_metrics
from hpa_nb.data.competition import load_labels
from hpa_nb.data.pipeline import eval_dataset
from hpa_nb.data.splits import holdout
from hpa_nb.plots import charts
from hpa_nb.plots.figures import save_figure
from hpa_nb.plots.training import training_history
from hpa_nb.sample.sources import find_data
from hpa_nb.training import run
from hpa_nb.training.inputs import run_data
from hpa_nb.training.predictions import DIHEDRAL_TRANSFORMS, ensemble_weights, predict, reorder, write_predictions
from hpa_nb.training.run import load_model

logger = logging.getLogger(__name__)

SPLITS = ("val", "all")
PREDICTIONS_FILE = "predictions.csv"
METRICS_FILE = "metrics.json"


@dataclass
class Evaluation:
    """What `evaluate` computed and wrote."""

    ids: list[str]
    y_true: np.ndarray  # [images, 19] multi-hot
    y_score: np.ndarray  # [images, 19] probabilities
    metrics: dict[str, Any]
    files: list[Path] = field(default_factory=list)

    def table(self) -> pd.DataFrame:
        return metrics_table(self.metrics)


def load_thresholds(path: str | os.PathLike) -> list[float | None]:
    """The per-class thresholds of an earlier evaluation's metrics.json, in class-index order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"thresholds file {path} does not exist")
    saved = json.loads(path.read_text()).get("thresholds")
    if not isinstance(saved, dict) or any(name not in saved for name in LABEL_NAMES):
        raise ValueError(f"{path} has no per-class thresholds (expected a metrics.json written by evaluate)")
    return [None if saved[name] is None else float(saved[name]) for name in LABEL_NAMES]


# --- which images ---------------------------------------------------------------------------
def held_out_ids(
    run_dir: str | os.PathLike,
    labels: pd.DataFrame,
    val_fraction: float,
    seed: int,
    folds: int | None = None,
    fold: int = 0,
) -> list[str]:
    """The validation IDs of a run, reproduced with `hpa_nb.data.splits.holdout` and checked against RUN/split.csv.

    Raises ValueError when they differ (the data folder changed since training, or it is a
    different folder) rather than silently scoring images the model trained on.
    """
    run_dir = Path(run_dir)
    ids = labels["ID"].astype(str).tolist()
    _, val_ids = holdout(ids, label_matrix(ids, labels["Label"]), val_fraction, seed, folds, fold)
    folder = run.RunFolder(run_dir)
    recorded = run.load_split(run_dir)["val"] if folder.split.is_file() else None
    if recorded is None:
        logger.info(f"note: {folder.split} not found; using the split reproduced from the config")
    elif set(recorded) != set(val_ids) or len(recorded) != len(val_ids):
        only_recorded = sorted(set(recorded) - set(val_ids))
        only_reproduced = sorted(set(val_ids) - set(recorded))
        example = (only_recorded or only_reproduced or ["(duplicates)"])[0]
        raise ValueError(
            f"the held-out split reproduced from {folder.config} (val_fraction={val_fraction}, seed={seed}, "
            f"folds={folds}, fold={fold}) "
            f"differs from {folder.split}: {len(only_recorded)} val IDs missing, {len(only_reproduced)} extra "
            f"(e.g. {example}); has the data folder changed since training?"
        )
    if not val_ids:
        raise ValueError(f"the run {run_dir} held out no images (val_fraction={val_fraction}); use --split all")
    return val_ids


# --- the per-class table --------------------------------------------------------------------
def metrics_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """Per-class scores as a DataFrame (NaN where undefined), for notebooks."""
    frame = pd.DataFrame(metrics["classes"]).set_index("name")
    columns = ["support", "roc_auc", "average_precision", "f1", "threshold"]
    return frame[columns].astype({"support": int}).astype({c: float for c in columns[1:]})


def format_table(metrics: dict[str, Any]) -> str:
    """A plain-text per-class table with the averages underneath, as the CLI prints it."""

    def number(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    width = max(len(name) for name in LABEL_NAMES)
    lines = [f"{'class':<{width}}  {'support':>7}  {'AUC':>6}  {'AP':>6}  {'F1':>6}  {'threshold':>9}"]
    for entry in metrics["classes"]:
        lines.append(
            f"{entry['name']:<{width}}  {entry['support']:>7}  {number(entry['roc_auc']):>6}  "
            f"{number(entry['average_precision']):>6}  {number(entry['f1']):>6}  "
            f"{number(entry['threshold']):>9}"
        )
    micro = metrics["micro"]
    lines.append("")
    lines.append(
        f"{metrics['images']} images, {metrics['classes_present']} of {len(metrics['classes'])} classes "
        f"present ('–': undefined, class absent)"
    )
    lines.append(
        f"macro ROC AUC {number(metrics['macro_roc_auc'])}   mAP {number(metrics['map'])}   "
        f"macro F1 {number(metrics['macro_f1'])}"
    )
    lines.append(
        f"micro ROC AUC {number(micro['roc_auc'])}   micro AP {number(micro['average_precision'])}   "
        f"micro F1 {number(micro['f1'])}"
    )
    return "\n".join(lines)


# --- the whole job --------------------------------------------------------------------------
def _write_outputs(out_dir: Path, result: Evaluation, run_dir: Path) -> list[Path]:
    files = [write_predictions(out_dir / PREDICTIONS_FILE, result.ids, result.y_score)]
    metrics_path = out_dir / METRICS_FILE
    write_text(metrics_path, json.dumps(result.metrics, indent=2, allow_nan=False) + "\n")
    files.append(metrics_path)
    files += save_figure(charts.per_class_scores(result.metrics), out_dir / "per_class_scores")
    if result.y_true.any():
        files += save_figure(
            charts.precision_recall_curves(result.y_true, result.y_score), out_dir / "precision_recall"
        )
    if run.RunFolder(run_dir).history.is_file():
        files += save_figure(training_history(run.RunFolder(run_dir).history), out_dir / "training_history")
    return files


def evaluate(
    run_dir: str | os.PathLike | Sequence[str | os.PathLike],
    data_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    split: str = "val",
    tta: bool = False,
    batch_size: int | None = None,
    thresholds: str | os.PathLike | None = None,
    weights: Sequence[float] | None = None,
) -> Evaluation:
    """Score a trained run, or the weighted average of several, on labelled images and write predictions.csv,
    metrics.json and plots.

    Args:
        run_dir: the run folder `train` wrote (model.keras, config.json, split.csv), or a list of them: an ensemble
            (each predicts at its own size and channels; `weights` default equal).
        data_dir: a labelled data folder in the competition layout; by default the (first) run's own data
            (`hpa_nb.training.inputs.run_data`: its saved folder, else the competition or sample found again).
        out_dir: where to write; by default ``RUN/eval_<split>`` (the first run's ``eval_<split>_ensemble`` for
            several). Nothing is written when the evaluation fails.
        split: "val" scores the run's held-out images (reproduced from its config and checked
            against RUN/split.csv; an ensemble's runs must hold out the same ones); "all" scores every image
            in train.csv of `data_dir`.
        tta: average the predictions over the 8 flips and rotations of each image.
        batch_size: images per prediction batch; by default the run's batch size.
        thresholds: an earlier evaluation's metrics.json (e.g. ``RUN/eval_val/metrics.json``)
            whose per-class thresholds F1 is scored at, instead of tuning them on these images:
            the honest F1 for a separate test folder.

    Returns an `Evaluation` (IDs, labels, probabilities, metrics dict, files written).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    run_dirs = run.folders(run_dir)
    weights = ensemble_weights(run_dirs, weights)
    for folder in run_dirs:
        if not folder.is_dir():
            raise FileNotFoundError(f"run folder {folder} does not exist")
    configs = [run.load_config(folder) for folder in run_dirs]
    if data_dir is None:  # the run's own data, found again here (it may be mounted elsewhere than in training)
        data_dir = run_data(run_dirs[0]) if configs[0].data.data_dir else find_data().path
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist (pass the labelled data folder with --data)")
    default_out = run.RunFolder(run_dirs[0]).evaluation(split if len(run_dirs) == 1 else f"{split}_ensemble")
    out_dir = Path(out_dir) if out_dir is not None else default_out
    labels = load_labels(data_dir)
    if split == "val":
        held = [
            held_out_ids(folder, labels, c.data.val_fraction, c.data.seed, c.data.folds, c.data.fold)
            for folder, c in zip(run_dirs, configs)
        ]
        for folder, other in zip(run_dirs[1:], held[1:]):
            if set(other) != set(held[0]):
                raise ValueError(
                    f"{folder} holds out other images than {run_dirs[0]}: an ensemble is scored on images "
                    "none of its runs trained on (--split all on a separate folder), and fold runs "
                    "out of fold with `python -m hpa_nb folds`"
                )
        ids = held[0]
    else:
        ids = labels["ID"].tolist()
    given_thresholds = load_thresholds(thresholds) if thresholds is not None else None
    names = ", ".join(str(folder) for folder in run_dirs)
    logger.info(f"evaluating {names} on {len(ids)} images ({split}) from {data_dir}" + (" with TTA" if tta else ""))
    y_score = 0.0
    for folder, config, weight in zip(run_dirs, configs, weights):
        size = int(batch_size or config.optimisation.batch_size)
        if size < 1:
            raise ValueError(f"batch size must be at least 1, got {size}")
        dataset = eval_dataset(data_dir, ids, config.data.image_size, config.data.channels, size, with_id=True)
        predicted_ids, y_true, scores = predict(load_model(folder), dataset, tta=tta, total=len(ids))
        if len(predicted_ids) != len(ids):
            missing = sorted(set(ids) - set(predicted_ids))
            raise ValueError(
                f"the data pipeline returned {len(predicted_ids)} images for the {len(ids)} asked for"
                + (f" (e.g. {missing[0]} is missing)" if missing else "")
                + f"; is {data_dir} complete?"
            )
        y_true, scores = reorder(ids, predicted_ids, y_true, scores)  # TFRecords come in file order
        y_score = y_score + weight * scores
    result = Evaluation(
        list(ids), y_true, np.asarray(y_score, np.float32), image_metrics(y_true, y_score, given_thresholds)
    )
    result.metrics = {
        "run": str(run_dirs[0]) if len(run_dirs) == 1 else [str(r) for r in run_dirs],
        **({"weights": list(weights)} if len(run_dirs) > 1 else {}),
        "data_dir": str(data_dir),
        "split": split,
        "tta": tta,
        "tta_transforms": list(DIHEDRAL_TRANSFORMS) if tta else ["identity"],
        "thresholds_from": str(thresholds) if thresholds is not None else "tuned on these images",
        **result.metrics,
    }
    result.files = _write_outputs(out_dir, result, run_dirs[0])
    return result
