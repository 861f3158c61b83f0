"""A multi-label stratified train/validation split of image IDs."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def split(ids: Sequence[str], labels_matrix: np.ndarray, val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """A deterministic multi-label stratified split: ``(train_ids, val_ids)`` in input order.

    Iterative stratification (Sechidis, Tsoumakas & Vlahavas, 2011): the rarest label is placed
    first, each of its images going to the side that still wants that label most. A label with
    at least two images is wanted at least once on each side, so rare classes reach both.
    """
    ids = [str(i) for i in ids]
    matrix = np.asarray(labels_matrix, dtype=bool)
    if matrix.ndim != 2 or matrix.shape[0] != len(ids):
        raise ValueError(f"labels matrix has shape {matrix.shape}, expected ({len(ids)}, classes)")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, not {val_fraction}")
    if len(set(ids)) != len(ids):
        raise ValueError("split: repeated image IDs")
    rng = np.random.default_rng(seed)
    count = len(ids)
    fractions = np.array([1.0 - val_fraction, val_fraction])
    wanted_images = fractions * count
    per_label = matrix.sum(axis=0).astype(float)
    wanted_labels = np.outer(fractions, per_label)  # [2 sides, labels]
    rare_enough = per_label >= 2
    wanted_labels[1, rare_enough] = np.maximum(wanted_labels[1, rare_enough], 1.0)
    wanted_labels[0, rare_enough] = np.maximum(per_label[rare_enough] - wanted_labels[1, rare_enough], 1.0)
    side = np.full(count, -1)
    remaining = matrix.copy()
    while remaining.any():
        label_sizes = remaining.sum(axis=0)
        candidates = np.flatnonzero(label_sizes == label_sizes[label_sizes > 0].min())
        label = rng.choice(candidates)
        for image in rng.permutation(np.flatnonzero(remaining[:, label])):
            scores = np.stack([wanted_labels[:, label], wanted_images, rng.random(2)], axis=1)
            chosen = max((0, 1), key=lambda s: tuple(scores[s]))
            side[image] = chosen
            wanted_labels[chosen] -= matrix[image]
            wanted_images[chosen] -= 1
            remaining[image] = False
    for image in rng.permutation(np.flatnonzero(side < 0)):  # images without labels
        chosen = int(np.argmax(wanted_images + rng.random(2) * 1e-6))
        side[image] = chosen
        wanted_images[chosen] -= 1
    return [i for i, s in zip(ids, side) if s == 0], [i for i, s in zip(ids, side) if s == 1]
