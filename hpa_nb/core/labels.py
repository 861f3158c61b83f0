"""The 19 localisation classes and the multi-hot labels of train.csv."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

LABEL_NAMES: tuple[str, ...] = (
    "Nucleoplasm",
    "Nuclear membrane",
    "Nucleoli",
    "Nucleoli fibrillar center",
    "Nuclear speckles",
    "Nuclear bodies",
    "Endoplasmic reticulum",
    "Golgi apparatus",
    "Intermediate filaments",
    "Actin filaments",
    "Microtubules",
    "Mitotic spindle",
    "Centrosome",
    "Plasma membrane",
    "Mitochondria",
    "Aggresome",
    "Cytosol",
    "Vesicles and punctate cytosolic patterns",
    "Negative",
)
N_CLASSES = len(LABEL_NAMES)
NEGATIVE = LABEL_NAMES.index("Negative")

# The four stains, in the channel order every reader, model and plot uses, and the channel sets a model takes.
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
CHANNEL_SETS: dict[str, tuple[str, ...]] = {"rgb": COLORS[:3], "rgby": COLORS}


def colors_of(channels: str) -> tuple[str, ...]:
    """The colour names behind a channel set such as ``"rgb"``."""
    if channels not in CHANNEL_SETS:
        raise ValueError(f"channels must be one of {sorted(CHANNEL_SETS)}, not {channels!r}")
    return CHANNEL_SETS[channels]


def parse_label(text: str, image_id: str = "?") -> np.ndarray:
    """Turn a train.csv label such as ``"8|5|0"`` into a float32 multi-hot vector of 19.

    Repeated classes (``"17|17"`` occurs in the real train.csv) are fine. An empty,
    non-integer or out-of-range class raises ``ValueError`` naming the image and the value.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"image {image_id}: empty label {text!r}")
    vector = np.zeros(N_CLASSES, np.float32)
    for part in text.strip().split("|"):
        try:
            index = int(part)
        except ValueError:
            raise ValueError(f"image {image_id}: label {text!r} has non-integer class {part!r}") from None
        if not 0 <= index < N_CLASSES:
            raise ValueError(f"image {image_id}: label {text!r} has class {index} outside 0..{N_CLASSES - 1}")
        vector[index] = 1.0
    return vector


def format_label(vector: Sequence[float]) -> str:
    """The inverse of `parse_label`: ``[1, 0, ..., 1, ...]`` → ``"0|8"``."""
    return "|".join(str(i) for i, on in enumerate(vector) if on)


def label_matrix(ids: Iterable[str], labels: Iterable[str]) -> np.ndarray:
    """Parse a column of labels into an ``[N, 19]`` float32 matrix."""
    rows = [parse_label(text, image_id) for image_id, text in zip(ids, labels)]
    return np.stack(rows) if rows else np.zeros((0, N_CLASSES), np.float32)


def names_of(vector: Sequence[float], threshold: float = 0.5) -> list[str]:
    """Class names whose entry in a label or probability vector reaches `threshold`."""
    return [LABEL_NAMES[i] for i, value in enumerate(vector) if value >= threshold]


def multi_hot(labels: np.ndarray) -> np.ndarray:
    """`labels` as a float32 ``[N, 19]`` multi-hot matrix, or a ValueError that gives the shape it had."""
    matrix = np.asarray(labels, np.float32)
    if matrix.ndim != 2 or matrix.shape[1] != N_CLASSES:
        raise ValueError(f"labels must be an [images, {N_CLASSES}] multi-hot matrix, got shape {matrix.shape}")
    return matrix


def label_counts(matrix: np.ndarray) -> np.ndarray:
    """Images per class, from an ``[N, 19]`` multi-hot matrix."""
    return np.asarray(matrix, np.float32).sum(axis=0).astype(np.int64)


def class_weights(matrix: np.ndarray, max_weight: float = 20.0) -> np.ndarray:
    """Per-class positive weights for binary cross-entropy: negatives / positives, clipped to [1, max_weight].

    This is the multi-label answer to imbalance (Keras's ``class_weight`` dict only
    weights whole samples by one class). A class with no positives gets ``max_weight``.
    """
    counts = label_counts(matrix).astype(np.float64)
    negatives = len(matrix) - counts
    ratio = np.where(counts > 0, negatives / np.maximum(counts, 1), max_weight)
    return np.clip(ratio, 1.0, max_weight).astype(np.float32)
