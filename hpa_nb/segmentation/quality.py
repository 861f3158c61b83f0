"""How well a segmentation matches the true cells: IoU tables, one-to-one matching, a score per image
and over a data set, and the sample's cell ground truth (``masks/`` and ``cells.csv``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from hpa_nb.core.labels import parse_label
from hpa_nb.segmentation.backends import segment
from hpa_nb.segmentation.classical import ClassicalSettings
from hpa_nb.segmentation.images import image_folder, read_channels, read_mask


def iou_table(predicted: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predicted ids, truth ids, IoU [P, T]) between two instance masks of one shape."""
    if predicted.shape != truth.shape:
        raise ValueError(f"masks differ in shape: {predicted.shape} vs {truth.shape}")
    predicted_ids, predicted_index = np.unique(predicted, return_inverse=True)
    truth_ids, truth_index = np.unique(truth, return_inverse=True)
    pairs = np.bincount(
        predicted_index.ravel() * len(truth_ids) + truth_index.ravel(), minlength=len(predicted_ids) * len(truth_ids)
    ).reshape(len(predicted_ids), len(truth_ids))
    predicted_area = pairs.sum(axis=1, keepdims=True)
    truth_area = pairs.sum(axis=0, keepdims=True)
    iou = pairs / np.maximum(predicted_area + truth_area - pairs, 1)
    keep_p, keep_t = predicted_ids > 0, truth_ids > 0
    return predicted_ids[keep_p], truth_ids[keep_t], iou[np.ix_(keep_p, keep_t)]


def match_cells(predicted: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching by IoU: ``[(predicted id, truth id, IoU)]`` with IoU ≥ threshold."""
    predicted_ids, truth_ids, iou = iou_table(predicted, truth)
    matches: list[tuple[int, int, float]] = []
    used_p: set[int] = set()
    used_t: set[int] = set()
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        p, t = divmod(int(flat), iou.shape[1])
        if iou[p, t] < threshold:
            break
        if p not in used_p and t not in used_t:
            used_p.add(p)
            used_t.add(t)
            matches.append((int(predicted_ids[p]), int(truth_ids[t]), float(iou[p, t])))
    return matches


@dataclass(frozen=True)
class SegmentationScore:
    """How a segmentation matches ground truth: matched pairs at IoU ≥ `threshold`."""

    truth_cells: int
    predicted_cells: int
    matched: int
    iou_sum: float
    threshold: float = 0.5

    @property
    def mean_iou(self) -> float:
        """Mean IoU over matched pairs."""
        return self.iou_sum / self.matched if self.matched else 0.0

    @property
    def recall(self) -> float:
        """Fraction of ground-truth cells found."""
        return self.matched / self.truth_cells if self.truth_cells else 1.0

    @property
    def precision(self) -> float:
        return self.matched / self.predicted_cells if self.predicted_cells else 1.0

    def __add__(self, other: "SegmentationScore") -> "SegmentationScore":
        return SegmentationScore(
            self.truth_cells + other.truth_cells,
            self.predicted_cells + other.predicted_cells,
            self.matched + other.matched,
            self.iou_sum + other.iou_sum,
            self.threshold,
        )

    def __str__(self) -> str:
        return (
            f"mean matched IoU {self.mean_iou:.3f}, found {self.recall:.1%} of {self.truth_cells} cells, "
            f"precision {self.precision:.1%} (IoU ≥ {self.threshold})"
        )


def score_segmentation(predicted: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> SegmentationScore:
    """Compare one predicted instance mask with its ground truth."""
    matches = match_cells(predicted, truth, threshold)
    return SegmentationScore(
        truth_cells=len(np.setdiff1d(np.unique(truth), [0])),
        predicted_cells=len(np.setdiff1d(np.unique(predicted), [0])),
        matched=len(matches),
        iou_sum=sum(iou for _, _, iou in matches),
        threshold=threshold,
    )


def segmentation_quality(
    data_dir: Path,
    ids: Sequence[str],
    method: str = "classical",
    settings: ClassicalSettings = ClassicalSettings(),
    threshold: float = 0.5,
    progress: bool = True,
    **method_options,
) -> SegmentationScore:
    """Segment sample images and score them against their ``masks/{ID}.png`` ground truth.

    Returns the pooled `SegmentationScore`: mean IoU over matched cells and the fraction of
    ground-truth cells found (matched one-to-one at IoU ≥ ``threshold``).
    """
    total = SegmentationScore(0, 0, 0, 0.0, threshold)
    for image_id in tqdm(ids, desc="segment", disable=not progress):
        channels = read_channels(image_folder(data_dir, image_id), image_id, ("red", "blue", "yellow"))
        predicted = segment(channels["red"], channels["blue"], channels["yellow"], method, settings, **method_options)
        total = total + score_segmentation(predicted, read_mask(data_dir, image_id), threshold)
    return total


def load_cell_truth(
    data_dir: Path, ids: Sequence[str] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, dict[int, np.ndarray]]]:
    """Ground truth of the sample for `hpa_nb.core.metrics.cell_map`: (masks, labels).

    ``masks[ID]`` is the uint16 instance mask ``masks/{ID}.png``; ``labels[ID][cell_id]`` is the
    cell's float32 multi-hot vector of 19 from ``cells.csv`` (columns ID, CellID, Label).
    """
    path = Path(data_dir) / "cells.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (only the synthetic sample has per-cell labels)")
    table = pd.read_csv(path, dtype={"ID": str, "CellID": int, "Label": str})
    wanted = list(dict.fromkeys(table["ID"])) if ids is None else list(ids)
    labels: dict[str, dict[int, np.ndarray]] = {image_id: {} for image_id in wanted}
    for image_id, cell_id, text in table[table["ID"].isin(set(wanted))].itertuples(index=False):
        labels[image_id][int(cell_id)] = parse_label(text, f"{image_id} cell {cell_id}")
    masks = {image_id: read_mask(data_dir, image_id) for image_id in wanted}
    return masks, labels
