"""Held-out evaluation of a training run: predictions.csv, metrics.json, plots and a per-class table.

``--split val`` (the default) scores exactly the images the run held out: the split is
reproduced from the run's saved config (``val_fraction``, ``seed``) and checked against
``RUN/split.csv``. ``--split all`` scores every labelled image of a data folder, for a separate
labelled test set. Per-class F1 thresholds are tuned on the evaluated images themselves (see
`hpa_nb.core.metrics.image_metrics`), so that F1 is optimistic; AUC and AP need no threshold. For a
separate test folder, pass the thresholds of a validation evaluation (``--thresholds``).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from hpa_nb.core.files import write_text
from hpa_nb.core.labels import LABEL_NAMES, N_CLASSES, label_matrix
from hpa_nb.core.metrics import image_metrics
from hpa_nb.data.competition import load_labels
from hpa_nb.data.pipeline import eval_dataset
from hpa_nb.data.splits import split
from hpa_nb.plots import charts
from hpa_nb.plots.figures import save_figure
from hpa_nb.plots.training import training_history
from hpa_nb.sample.sources import find_data
from hpa_nb.training import run
from hpa_nb.training.inputs import run_data
from hpa_nb.training.run import load_model

SPLITS = ("val", "all")
PREDICTIONS_FILE = "predictions.csv"
METRICS_FILE = "metrics.json"

# Test-time augmentation: the 8 symmetries of a square (the dihedral group D4). Cell images have no
# preferred orientation, so a model should answer the same for each; averaging evens out its errors.
# Arrays are batches [N, height, width, channels]; axes 1 and 2 are the image plane.
DIHEDRAL_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda batch: batch,
    "rot90": lambda batch: np.rot90(batch, 1, axes=(1, 2)),
    "rot180": lambda batch: np.rot90(batch, 2, axes=(1, 2)),
    "rot270": lambda batch: np.rot90(batch, 3, axes=(1, 2)),
    "flip": lambda batch: batch[:, :, ::-1],
    "flip_rot90": lambda batch: np.rot90(batch[:, :, ::-1], 1, axes=(1, 2)),
    "flip_rot180": lambda batch: np.rot90(batch[:, :, ::-1], 2, axes=(1, 2)),
    "flip_rot270": lambda batch: np.rot90(batch[:, :, ::-1], 3, axes=(1, 2)),
}


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


# --- predictions.csv ------------------------------------------------------------------------
def write_predictions(path: str | os.PathLike, ids: Sequence[str], probabilities: np.ndarray) -> Path:
    """Write ``ID`` + one probability column per class, headed by the label names in class-index order."""
    scores = np.asarray(probabilities, np.float64)
    if scores.shape != (len(ids), N_CLASSES):
        raise ValueError(f"{len(ids)} IDs need probabilities of shape ({len(ids)}, {N_CLASSES}), got {scores.shape}")
    frame = pd.DataFrame(scores, columns=list(LABEL_NAMES))
    frame.insert(0, "ID", list(ids))
    path = Path(path)
    # 7 significant digits: float32's own precision, and tiny probabilities keep their order.
    write_text(path, frame.to_csv(index=False, float_format="%.7g"))
    return path


def read_predictions(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Read a predictions.csv back as (IDs in file order, float32 probabilities [N, 19] in class-index order)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file {path} does not exist")
    frame = pd.read_csv(path, dtype={"ID": str})
    expected = ["ID", *LABEL_NAMES]
    if list(frame.columns) != expected:
        missing = [name for name in expected if name not in frame.columns]
        detail = f"missing {missing}" if missing else f"columns out of order: {list(frame.columns)}"
        raise ValueError(f"{path} is not a predictions file ({detail})")
    return frame["ID"].tolist(), frame[list(LABEL_NAMES)].to_numpy(np.float32)


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
def held_out_ids(run_dir: str | os.PathLike, labels: pd.DataFrame, val_fraction: float, seed: int) -> list[str]:
    """The validation IDs of a run, reproduced with `hpa_nb.data.splits.split` and checked against RUN/split.csv.

    Raises ValueError when they differ (the data folder changed since training, or it is a
    different folder) rather than silently scoring images the model trained on.
    """
    run_dir = Path(run_dir)
    ids = labels["ID"].astype(str).tolist()
    _, val_ids = split(ids, label_matrix(ids, labels["Label"]), val_fraction, seed)
    folder = run.RunFolder(run_dir)
    recorded = run.load_split(run_dir)["val"] if folder.split.is_file() else None
    if recorded is None:
        print(f"note: {folder.split} not found; using the split reproduced from the config", file=sys.stderr)
    elif set(recorded) != set(val_ids) or len(recorded) != len(val_ids):
        only_recorded = sorted(set(recorded) - set(val_ids))
        only_reproduced = sorted(set(val_ids) - set(recorded))
        example = (only_recorded or only_reproduced or ["(duplicates)"])[0]
        raise ValueError(
            f"the held-out split reproduced from {folder.config} (val_fraction={val_fraction}, seed={seed}) "
            f"differs from {folder.split}: {len(only_recorded)} val IDs missing, {len(only_reproduced)} extra "
            f"(e.g. {example}); has the data folder changed since training?")
    if not val_ids:
        raise ValueError(f"the run {run_dir} held out no images (val_fraction={val_fraction}); use --split all")
    return val_ids


# --- predicting -----------------------------------------------------------------------------
def predict(model: Any, dataset: Iterable, tta: bool = False, total: int | None = None,
            transforms: Sequence[str] | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Run `model` over a batched ``(image, label, id)`` dataset: (IDs, labels [N, 19], probabilities [N, 19]).

    With `tta`, each batch is predicted under every transform in `transforms` (default: all 8
    of `DIHEDRAL_TRANSFORMS`, so 8× the work) and the probabilities are averaged.
    """
    names = list(transforms or DIHEDRAL_TRANSFORMS) if tta else ["identity"]
    unknown = [name for name in names if name not in DIHEDRAL_TRANSFORMS]
    if unknown:
        raise ValueError(f"unknown TTA transforms {unknown}; choose from {', '.join(DIHEDRAL_TRANSFORMS)}")
    all_ids: list[str] = []
    labels, scores = [], []
    with tqdm(total=total, unit="image", desc="predicting" + (f" (TTA ×{len(names)})" if tta else "")) as progress:
        for images, batch_labels, batch_ids in dataset:
            batch = np.asarray(images)
            # Plain numpy in, numpy out: the same loop works on every Keras backend.
            probabilities = np.mean([np.asarray(model.predict_on_batch(np.ascontiguousarray(
                DIHEDRAL_TRANSFORMS[name](batch)))) for name in names], axis=0)
            all_ids.extend(value.decode() if isinstance(value, bytes) else str(value)
                           for value in np.asarray(batch_ids))
            labels.append(np.asarray(batch_labels, np.float32))
            scores.append(probabilities.astype(np.float32))
            progress.update(len(batch))
    empty = np.zeros((0, N_CLASSES), np.float32)
    return all_ids, np.concatenate(labels) if labels else empty, np.concatenate(scores) if scores else empty


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
        lines.append(f"{entry['name']:<{width}}  {entry['support']:>7}  {number(entry['roc_auc']):>6}  "
                     f"{number(entry['average_precision']):>6}  {number(entry['f1']):>6}  "
                     f"{number(entry['threshold']):>9}")
    micro = metrics["micro"]
    lines.append("")
    lines.append(f"{metrics['images']} images, {metrics['classes_present']} of {len(metrics['classes'])} classes "
                 f"present ('–': undefined, class absent)")
    lines.append(f"macro ROC AUC {number(metrics['macro_roc_auc'])}   mAP {number(metrics['map'])}   "
                 f"macro F1 {number(metrics['macro_f1'])}")
    lines.append(f"micro ROC AUC {number(micro['roc_auc'])}   micro AP {number(micro['average_precision'])}   "
                 f"micro F1 {number(micro['f1'])}")
    return "\n".join(lines)


# --- the whole job --------------------------------------------------------------------------
def _write_outputs(out_dir: Path, result: Evaluation, run_dir: Path) -> list[Path]:
    files = [write_predictions(out_dir / PREDICTIONS_FILE, result.ids, result.y_score)]
    metrics_path = out_dir / METRICS_FILE
    write_text(metrics_path, json.dumps(result.metrics, indent=2, allow_nan=False) + "\n")
    files.append(metrics_path)
    files += save_figure(charts.per_class_scores(result.metrics), out_dir / "per_class_scores")
    if result.y_true.any():
        files += save_figure(charts.precision_recall_curves(result.y_true, result.y_score), out_dir / "precision_recall")
    if run.RunFolder(run_dir).history.is_file():
        files += save_figure(training_history(run.RunFolder(run_dir).history), out_dir / "training_history")
    return files


def evaluate(run_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None,
             out_dir: str | os.PathLike | None = None, split: str = "val", tta: bool = False,
             batch_size: int | None = None, thresholds: str | os.PathLike | None = None) -> Evaluation:
    """Score a trained run on labelled images and write predictions.csv, metrics.json and plots.

    Args:
        run_dir: the run folder `train` wrote (model.keras, config.json, split.csv).
        data_dir: a labelled data folder in the competition layout; by default the run's own data
            (`hpa_nb.training.inputs.run_data`: its saved folder, else the competition or sample found again).
        out_dir: where to write; by default ``RUN/eval_<split>``. Nothing is written when the
            evaluation fails.
        split: "val" scores the run's held-out images (reproduced from its config and checked
            against RUN/split.csv); "all" scores every image in train.csv of `data_dir`.
        tta: average the predictions over the 8 flips and rotations of each image.
        batch_size: images per prediction batch; by default the run's batch size.
        thresholds: an earlier evaluation's metrics.json (e.g. ``RUN/eval_val/metrics.json``)
            whose per-class thresholds F1 is scored at, instead of tuning them on these images:
            the honest F1 for a separate test folder.

    Returns an `Evaluation` (IDs, labels, probabilities, metrics dict, files written).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")

    config = run.load_config(run_dir)
    if data_dir is None:  # the run's own data, found again here (it may be mounted elsewhere than in training)

        data_dir = run_data(run_dir) if config.data_dir else find_data().path
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist (pass the labelled data folder with --data)")
    out_dir = Path(out_dir) if out_dir is not None else run.RunFolder(run_dir).evaluation(split)
    labels = load_labels(data_dir)
    ids = held_out_ids(run_dir, labels, config.val_fraction, config.seed) if split == "val" else labels["ID"].tolist()
    given_thresholds = load_thresholds(thresholds) if thresholds is not None else None
    batch_size = int(batch_size or config.batch_size)
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    print(f"evaluating {run_dir} on {len(ids)} images ({split}) from {data_dir}" + (" with TTA" if tta else ""))
    model = load_model(run_dir)
    dataset = eval_dataset(data_dir, ids, config.image_size, config.channels, batch_size, with_id=True)
    predicted_ids, y_true, y_score = predict(model, dataset, tta=tta, total=len(ids))
    if sorted(predicted_ids) != sorted(ids):
        missing = sorted(set(ids) - set(predicted_ids))
        raise ValueError(f"the data pipeline returned {len(predicted_ids)} images for the {len(ids)} asked for"
                         + (f" (e.g. {missing[0]} is missing)" if missing else "") + f"; is {data_dir} complete?")
    result = Evaluation(predicted_ids, y_true, y_score, image_metrics(y_true, y_score, given_thresholds))
    result.metrics = {"run": str(run_dir), "data_dir": str(data_dir), "split": split, "tta": tta,
                      "tta_transforms": list(DIHEDRAL_TRANSFORMS) if tta else ["identity"],
                      "thresholds_from": str(thresholds) if thresholds is not None else "tuned on these images",
                      **result.metrics}
    result.files = _write_outputs(out_dir, result, run_dir)
    return result
