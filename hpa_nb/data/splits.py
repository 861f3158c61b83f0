"""Multi-label stratified splits of image IDs: a train/validation split (`split`), K folds (`folds`), and the
held-out part a run validates on (`holdout`), which keeps images of extra data sources on the training side."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _stratify(matrix: np.ndarray, fractions: np.ndarray, seed: int) -> np.ndarray:
    """Each image's side (0 .. len(fractions) - 1) by iterative stratification (Sechidis, Tsoumakas & Vlahavas,
    2011): the rarest label is placed first, each of its images going to the side that still wants that label most.
    A label with at least as many images as sides is wanted at least once on each side, so rare classes reach all."""
    rng = np.random.default_rng(seed)
    count, sides = len(matrix), len(fractions)
    wanted_images = fractions * count
    per_label = matrix.sum(axis=0).astype(float)
    wanted_labels = np.outer(fractions, per_label)  # [sides, labels]
    rare_enough = per_label >= sides
    wanted_labels[1:, rare_enough] = np.maximum(wanted_labels[1:, rare_enough], 1.0)
    wanted_labels[0, rare_enough] = np.maximum(per_label[rare_enough] - wanted_labels[1:, rare_enough].sum(axis=0), 1.0)
    side = np.full(count, -1)
    remaining = matrix.copy()
    while remaining.any():
        label_sizes = remaining.sum(axis=0)
        candidates = np.flatnonzero(label_sizes == label_sizes[label_sizes > 0].min())
        label = rng.choice(candidates)
        for image in rng.permutation(np.flatnonzero(remaining[:, label])):
            scores = np.stack([wanted_labels[:, label], wanted_images, rng.random(sides)], axis=1)
            chosen = max(range(sides), key=lambda s: tuple(scores[s]))
            side[image] = chosen
            wanted_labels[chosen] -= matrix[image]
            wanted_images[chosen] -= 1
            remaining[image] = False
    for image in rng.permutation(np.flatnonzero(side < 0)):  # images without labels
        chosen = int(np.argmax(wanted_images + rng.random(sides) * 1e-6))
        side[image] = chosen
        wanted_images[chosen] -= 1
    return side


def _checked(ids: Sequence[str], labels_matrix: np.ndarray) -> tuple[list[str], np.ndarray]:
    ids = [str(i) for i in ids]
    matrix = np.asarray(labels_matrix, dtype=bool)
    if matrix.ndim != 2 or matrix.shape[0] != len(ids):
        raise ValueError(f"labels matrix has shape {matrix.shape}, expected ({len(ids)}, classes)")
    if len(set(ids)) != len(ids):
        raise ValueError("split: repeated image IDs")
    return ids, matrix


def split(
    ids: Sequence[str], labels_matrix: np.ndarray, val_fraction: float, seed: int = 0
) -> tuple[list[str], list[str]]:
    """A deterministic multi-label stratified split: ``(train_ids, val_ids)`` in input order."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, not {val_fraction}")
    ids, matrix = _checked(ids, labels_matrix)
    side = _stratify(matrix, np.array([1.0 - val_fraction, val_fraction]), seed)
    return [i for i, s in zip(ids, side) if s == 0], [i for i, s in zip(ids, side) if s == 1]


def folds(ids: Sequence[str], labels_matrix: np.ndarray, k: int, seed: int = 0) -> list[list[str]]:
    """`ids` in `k` multi-label stratified folds of about equal size (each in input order), the same for a seed."""
    if k < 2:
        raise ValueError(f"folds must be at least 2, not {k}")
    ids, matrix = _checked(ids, labels_matrix)
    if len(ids) < k:
        raise ValueError(f"{len(ids)} images cannot make {k} folds")
    side = _stratify(matrix, np.full(k, 1.0 / k), seed)
    return [[i for i, s in zip(ids, side) if s == fold] for fold in range(k)]


def holdout(
    ids: Sequence[str],
    labels_matrix: np.ndarray,
    val_fraction: float,
    seed: int,
    n_folds: int | None = None,
    fold: int = 0,
    train_only: Sequence[str] = (),
) -> tuple[list[str], list[str]]:
    """``(train_ids, val_ids)`` of one run: with `n_folds`, fold `fold` of `folds` held out and the others trained on;
    else `split`. IDs in `train_only` (extra data sources) are never held out: they are left out of the drawing,
    which is the same as without them, and go to the training side."""
    extra = set(train_only)
    drawn = [index for index, image_id in enumerate(ids) if image_id not in extra]
    drawn_ids = [ids[index] for index in drawn]
    drawn_matrix = np.asarray(labels_matrix)[drawn]
    if n_folds:
        if not 0 <= fold < n_folds:
            raise ValueError(f"fold {fold} is not one of 0..{n_folds - 1}")
        parts = folds(drawn_ids, drawn_matrix, n_folds, seed)
        held = set(parts[fold])
        train_ids, val_ids = [i for i in drawn_ids if i not in held], parts[fold]
    else:
        train_ids, val_ids = split(drawn_ids, drawn_matrix, val_fraction, seed)
    return train_ids + [str(i) for i in ids if i in extra], val_ids
