"""The scores: image-level metrics through scikit-learn, and the competition's cell-level mAP, which no library has.

Every image-level score is computed per class from ``y_true`` (multi-hot ``[N, C]``) and ``y_score``
(probabilities ``[N, C]``) with `sklearn.metrics`. A score that is undefined on the evaluated images (a class
with no positives, or no negatives for ROC AUC) is ``None`` (JSON ``null``): never a crash (scikit-learn raises
or warns there) and never a made-up 0.5. Averages skip those classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from sklearn import metrics as sk

from hpa_nb.core.labels import LABEL_NAMES, N_CLASSES

# Used for micro-F1 where a class has no tuned threshold (it has no positives on the evaluated images).
DEFAULT_THRESHOLD = 0.5

THRESHOLD_NOTE = (
    "F1 uses, per class, the threshold that maximises F1 on the evaluated images themselves "
    "(midway between two neighbouring scores); that F1 is therefore optimistic. "
    "Predict a class when its probability >= its threshold."
)


def _as_binary_pair(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate one class's labels and scores and return them as flat bool / float64 arrays."""
    truth = np.asarray(y_true).ravel()
    score = np.asarray(y_score, np.float64).ravel()
    if truth.shape != score.shape:
        raise ValueError(f"labels have {truth.size} entries but scores have {score.size}")
    if not np.isfinite(score).all():
        raise ValueError("scores contain NaN or infinity")
    if not np.isin(truth, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return truth.astype(bool), score


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float | None:
    """Binary ROC AUC (ties count half); None without both positives and negatives."""
    truth, score = _as_binary_pair(y_true, y_score)
    if truth.all() or not truth.any():
        return None
    return float(sk.roc_auc_score(truth, score))


def precision_recall_curve(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and increasing thresholds (`sklearn.metrics.precision_recall_curve`).

    Raises ValueError when there is no positive (the curve is undefined).
    """
    truth, score = _as_binary_pair(y_true, y_score)
    if not truth.any():
        raise ValueError("a precision-recall curve needs at least one positive")
    return sk.precision_recall_curve(truth, score)


def average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float | None:
    """Average precision, sum of (R_n - R_{n-1}) * P_n; None without positives."""
    truth, score = _as_binary_pair(y_true, y_score)
    if not truth.any():
        return None
    return float(sk.average_precision_score(truth, score))


def f1_score(y_true: np.ndarray, y_pred: np.ndarray) -> float | None:
    """F1 of binary predictions; None when there is no positive, neither true nor predicted."""
    truth, predicted = _as_binary_pair(y_true, np.asarray(y_pred, np.float64))
    if not truth.any() and not (predicted > 0).any():
        return None
    return float(sk.f1_score(truth, predicted > 0))


def best_f1_threshold(y_true: np.ndarray, y_score: np.ndarray) -> tuple[float | None, float | None]:
    """(F1, threshold) maximising F1 of ``score >= threshold``; (None, None) without positives.

    The threshold sits midway between the lowest score predicted positive and the next lower
    score, so the F1 is the same as at the score itself but new images near it are not all on
    one side. Among equal F1s the highest threshold wins (fewer false positives).
    """
    truth, score = _as_binary_pair(y_true, y_score)
    if not truth.any():
        return None, None
    precision, recall, thresholds = sk.precision_recall_curve(truth, score)  # thresholds ascending
    precision, recall = precision[:-1], recall[:-1]  # the closing (1, 0) point has no threshold
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros_like(precision), where=precision + recall > 0
    )
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))  # the last maximum: the highest threshold among equal F1s
    lower = thresholds[best - 1] if best > 0 else thresholds[best]
    return float(f1[best]), float((thresholds[best] + lower) / 2.0)


def _mean_of_defined(values: Sequence[float | None]) -> float | None:
    defined = [value for value in values if value is not None]
    return float(np.mean(defined)) if defined else None


def _check_matrices(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    truth = np.asarray(y_true)
    score = np.asarray(y_score, np.float64)
    if truth.ndim != 2 or truth.shape != score.shape:
        raise ValueError(f"labels {truth.shape} and scores {score.shape} must both be [images, classes]")
    return truth, score


def image_metrics(
    y_true: np.ndarray,
    y_score: np.ndarray,
    thresholds: Sequence[float | None] | None = None,
    class_names: Sequence[str] = LABEL_NAMES,
) -> dict:
    """All image-level scores of probabilities ``y_score`` against multi-hot ``y_true``, as a JSON-ready dict.

    Per class: ``support`` (positive images), ``roc_auc``, ``average_precision``, ``f1`` and
    ``threshold``. Without ``thresholds`` each class's threshold is tuned to maximise its F1 on
    these same images (see `best_f1_threshold`); pass thresholds tuned elsewhere to score F1 at
    them instead. Averages: ``macro_roc_auc`` and ``map`` (mean average precision) and
    ``macro_f1`` over the classes where the score is defined; ``micro`` pools every
    (image, class) pair, with `DEFAULT_THRESHOLD` for classes lacking a threshold.
    Undefined scores are ``None``.
    """
    truth, score = _check_matrices(y_true, y_score)
    if len(class_names) != truth.shape[1]:
        raise ValueError(f"{len(class_names)} class names for {truth.shape[1]} score columns")
    if thresholds is not None and len(thresholds) != truth.shape[1]:
        raise ValueError(f"{len(thresholds)} thresholds for {truth.shape[1]} classes")
    classes = []
    for index, name in enumerate(class_names):
        column_truth, column_score = truth[:, index], score[:, index]
        if thresholds is None:
            f1, threshold = best_f1_threshold(column_truth, column_score)
        else:
            threshold = None if thresholds[index] is None else float(thresholds[index])
            f1 = None
            if threshold is not None and column_truth.any():
                f1 = f1_score(column_truth, column_score >= threshold)
        classes.append(
            {
                "index": index,
                "name": name,
                "support": int(np.sum(column_truth)),
                "roc_auc": roc_auc(column_truth, column_score),
                "average_precision": average_precision(column_truth, column_score),
                "f1": f1,
                "threshold": threshold,
            }
        )
    used = np.array([DEFAULT_THRESHOLD if c["threshold"] is None else c["threshold"] for c in classes])
    return {
        "images": int(truth.shape[0]),
        "classes_present": sum(c["support"] > 0 for c in classes),
        "macro_roc_auc": _mean_of_defined([c["roc_auc"] for c in classes]),
        "map": _mean_of_defined([c["average_precision"] for c in classes]),
        "macro_f1": _mean_of_defined([c["f1"] for c in classes]),
        "micro": {
            "roc_auc": roc_auc(truth, score),
            "average_precision": average_precision(truth, score),
            "f1": f1_score(truth, score >= used) if truth.size else None,
        },
        "thresholds": {c["name"]: c["threshold"] for c in classes},
        "threshold_note": THRESHOLD_NOTE if thresholds is None else "F1 at the thresholds given.",
        "classes": classes,
    }


# --- cell-level mAP (the competition metric) ----------------------------------------------
# predictions: {image_id: [(mask, scores), ...]}, one entry per predicted cell, where `mask` is a
#   boolean [H, W] array at the image's original size and `scores` is either a length-19 sequence
#   (a confidence for every class) or a {class index: confidence} mapping (only the classes
#   predicted for that cell). `hpa_nb.cells.scoring.CellPredictions.as_map_input()` builds such a list.
# truth_masks: {image_id: uint16 [H, W] instance mask, 0 = background}.
# truth_labels: {image_id: {cell id: multi-hot numpy vector of 19, or a set / list of class indices}}.
def _class_set(labels) -> set[int]:
    """A cell's classes from a multi-hot numpy vector of 19, or a set / list of class indices."""
    if isinstance(labels, np.ndarray):
        if labels.size != len(LABEL_NAMES):
            raise ValueError(f"a cell's multi-hot label must have {len(LABEL_NAMES)} entries, got {labels.size}")
        return {int(i) for i in np.flatnonzero(labels)}
    return {int(i) for i in labels}


def _scores_by_class(scores) -> dict[int, float]:
    if isinstance(scores, Mapping):
        return {int(c): float(v) for c, v in scores.items()}
    values = np.asarray(scores, np.float64).ravel()
    if values.size != len(LABEL_NAMES):
        raise ValueError(f"a cell's scores must have {len(LABEL_NAMES)} entries, got {values.size}")
    return {c: float(v) for c, v in enumerate(values)}


def _average_precision(true_positive: np.ndarray, positives: int) -> float:
    """OpenImages' AP: area under the precision envelope (precision made non-increasing in recall)."""
    if positives == 0:
        raise ValueError("average precision needs at least one positive")
    if true_positive.size == 0:
        return 0.0
    hits = np.cumsum(true_positive)
    precision = hits / np.arange(1, true_positive.size + 1)
    recall = hits / positives
    precision = np.concatenate([[0.0], precision, [0.0]])
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


# The two readings of "identical to the OpenImages Instance Segmentation Challenge evaluation" (Kaggle's
# page). Which one Kaggle's scorer used is not public; `cell_average_precisions` describes both.
READINGS = ("challenge", "all_classes")


def cell_average_precisions(
    predictions, truth_masks, truth_labels, iou: float = 0.6, reading: str = "challenge"
) -> list[float | None]:
    """Per-class AP of cell predictions (19 entries; ``None`` for a class no ground-truth cell has).

    OpenImages-style: for each class, the predictions carrying that class are ranked by confidence
    (ties keep input order); each one matches the ground-truth cell *of that class* in its image
    with the highest mask IoU, if that IoU is ≥ ``iou`` and the cell was not matched before (a
    duplicate is a false positive); unmatched predictions are false positives; ground-truth cells
    never matched are missed. Images in the truth but absent from ``predictions`` count as
    predicting nothing. Input structures: see the comment above.

    ``reading`` (`READINGS`) decides which detections count:

    - ``"challenge"``: as the OpenImages *Challenge* evaluator (`object_detection`'s
      ``OpenImagesChallengeEvaluator``, which the hosts' own re-scoring in
      HPA_SingleCellClassification_Analysis runs on one ground-truth row per cell and label):
      only an image's evaluatable classes count, the classes of its labelled cells. A detection of
      any other class is dropped, and so is every detection on an image without a labelled cell.
    - ``"all_classes"``: every detection counts, so a class the image's cells lack is a false positive.

    In both, a predicted mask without pixels is dropped and a ground-truth cell without pixels is
    not counted, as the OpenImages evaluator does.
    """
    matches = match_cells(
        {image_id: [mask for mask, _ in cells] for image_id, cells in predictions.items()}, truth_masks, truth_labels
    )
    return matches.average_precisions([scores for cells in predictions.values() for _, scores in cells], iou, reading)


@dataclass
class CellMatches:
    """Predicted cells matched against the true ones once (every mask IoU), to be ranked under any scores:
    `average_precisions` costs a sort per class, so scoring rules can be compared or tuned on the same cells."""

    cell_classes: dict[str, dict[int, set[int]]]  # image → true cell → its classes
    evaluatable: dict[str, set[int]]  # image → the classes of its labelled cells
    positives: np.ndarray  # [19] true cells per class
    rows: list[tuple[str, np.ndarray | None]]  # per predicted cell, in order: (image, IoU with each true cell id)

    def average_precisions(self, scores: Sequence, iou: float = 0.6, reading: str = "challenge") -> list[float | None]:
        """Per-class AP (`cell_average_precisions`) with ``scores[i]`` the scores of predicted cell ``i``."""
        if reading not in READINGS:
            raise ValueError(f"reading {reading!r} is not one of {', '.join(READINGS)}")
        if len(scores) != len(self.rows):
            raise ValueError(f"{len(scores)} cells' scores for {len(self.rows)} predicted cells")
        detections: list[list[tuple[float, str, np.ndarray]]] = [[] for _ in LABEL_NAMES]
        for (image_id, overlap), cell_scores in zip(self.rows, scores):
            if overlap is None:  # a mask without pixels
                continue
            for c, confidence in _scores_by_class(cell_scores).items():
                if reading == "all_classes" or c in self.evaluatable[image_id]:
                    detections[c].append((confidence, image_id, overlap))
        results: list[float | None] = []
        for c in range(len(LABEL_NAMES)):
            if self.positives[c] == 0:
                results.append(None)
                continue
            ranked = sorted(detections[c], key=lambda item: -item[0])  # sorted() is stable
            matched: set[tuple[str, int]] = set()
            true_positive = np.zeros(len(ranked))
            for row, (_, image_id, overlap) in enumerate(ranked):
                candidates = [
                    cell
                    for cell, classes in self.cell_classes[image_id].items()
                    if c in classes and cell < overlap.size
                ]
                if not candidates:
                    continue
                best = max(candidates, key=lambda cell: overlap[cell])
                if overlap[best] >= iou and (image_id, best) not in matched:
                    matched.add((image_id, best))
                    true_positive[row] = 1.0
            results.append(_average_precision(true_positive, int(self.positives[c])))
        return results

    def mean_average_precision(self, scores: Sequence, iou: float = 0.6, reading: str = "challenge") -> float:
        """The mean of `average_precisions` over the classes present (0 when none is)."""
        return float(np.mean([ap for ap in self.average_precisions(scores, iou, reading) if ap is not None] or [0.0]))


def match_cells(prediction_masks: Mapping[str, Sequence[np.ndarray]], truth_masks, truth_labels) -> CellMatches:
    """`CellMatches` of the predicted cell masks (``{image: [bool mask, ...]}``, in order) against the truth."""
    unknown = sorted(set(prediction_masks) - set(truth_masks))
    if unknown:
        raise ValueError(f"image {unknown[0]} has predictions but no ground-truth mask")
    cell_classes: dict[str, dict[int, set[int]]] = {}
    for image_id, mask in truth_masks.items():
        area = np.bincount(np.asarray(mask).ravel())
        cell_classes[image_id] = {
            int(cell): _class_set(labels)
            for cell, labels in truth_labels.get(image_id, {}).items()
            if 0 < int(cell) < area.size and area[int(cell)] > 0
        }
    evaluatable = {image_id: set().union(*cells.values()) for image_id, cells in cell_classes.items()}
    positives = np.zeros(len(LABEL_NAMES), np.int64)
    for cells in cell_classes.values():
        for classes in cells.values():
            for c in classes:
                positives[c] += 1
    # One IoU row per predicted cell, against every truth id of its image.
    rows: list[tuple[str, np.ndarray | None]] = []
    for image_id, masks in prediction_masks.items():
        truth = np.asarray(truth_masks[image_id])
        truth_area = np.bincount(truth.ravel())
        for mask in masks:
            mask = np.asarray(mask, bool)
            if mask.shape != truth.shape:
                raise ValueError(f"image {image_id}: predicted mask {mask.shape} differs from truth {truth.shape}")
            area = mask.sum()
            if area == 0:
                rows.append((image_id, None))
                continue
            inside = np.bincount(truth[mask], minlength=truth_area.size)
            overlap = inside / np.maximum(area + truth_area - inside, 1)
            overlap[0] = 0.0
            rows.append((image_id, overlap))
    return CellMatches(cell_classes, evaluatable, positives, rows)


def cell_map(predictions, truth_masks, truth_labels, iou: float = 0.6, reading: str = "challenge") -> float:
    """The competition's score: mean over classes present in the truth of `cell_average_precisions`.

    ``predictions = {image_id: [(bool mask [H, W], scores), ...]}`` with scores a vector of 19 or
    ``{class: confidence}``; ``truth_masks = {image_id: instance mask}``;
    ``truth_labels = {image_id: {cell_id: multi-hot [19] or class indices}}``
    (`hpa_nb.segmentation.quality.load_cell_truth` reads both from a sample). ``reading``: see
    `cell_average_precisions`. Perfect predictions score 1.0 in both readings.
    """
    scores = [
        ap for ap in cell_average_precisions(predictions, truth_masks, truth_labels, iou, reading) if ap is not None
    ]
    if not scores:
        raise ValueError("the ground truth has no labelled cells")
    return float(np.mean(scores))


@dataclass
class CellPredictions:
    """One image's cells and their scores: ``scores[i]`` belongs to cell ``cell_ids[i]`` of ``mask``."""

    mask: np.ndarray  # uint16 [H, W] instance mask at the original size
    cell_ids: np.ndarray  # int64 [N]
    scores: np.ndarray  # float32 [N, 19]
    image_probs: np.ndarray = field(default_factory=lambda: np.zeros(N_CLASSES, np.float32))
    cell_probs: np.ndarray | None = None  # float32 [N, 19]: the cell term the scores were made from, where kept
    cam_probs: np.ndarray | None = None  # float32 [N, 19]: the image model's class maps pooled in each cell, where kept
    encoded: tuple[str, ...] | None = None  # each cell's mask in the competition's encoding, where a worker made it

    def as_map_input(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The ``(boolean mask, scores[19])`` list that `hpa_nb.core.metrics.cell_map` takes per image."""
        return [(self.mask == cell_id, scores) for cell_id, scores in zip(self.cell_ids, self.scores)]
