"""Predictions of a model over a dataset, and the ``predictions.csv`` file that holds them (ID, then one
probability per class): evaluation's output and every run's held-out predictions (``RUN/oof.csv``). Test-time
augmentation averages the 8 flips and rotations of a square (`DIHEDRAL_TRANSFORMS`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from hpa_nb.core.files import write_text
from hpa_nb.core.labels import LABEL_NAMES, N_CLASSES

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


def transform_names(tta: bool, transforms: Sequence[str] | None = None) -> list[str]:
    """The transforms a prediction averages: `transforms` (default: all of `DIHEDRAL_TRANSFORMS`) with `tta`, else
    the identity alone."""
    names = list(transforms or DIHEDRAL_TRANSFORMS) if tta else ["identity"]
    unknown = [name for name in names if name not in DIHEDRAL_TRANSFORMS]
    if unknown:
        raise ValueError(f"unknown TTA transforms {unknown}; choose from {', '.join(DIHEDRAL_TRANSFORMS)}")
    return names


def averaged(predict_batch: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """`predict_batch` over each transform of `batch` in `names`, averaged: test-time augmentation."""
    return np.mean(
        [
            np.asarray(predict_batch(np.ascontiguousarray(DIHEDRAL_TRANSFORMS[name](batch))), np.float32)
            for name in names
        ],
        axis=0,
    )


def padded(
    model: Any, multiple: int, forward: Callable[[np.ndarray], np.ndarray] | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """``model.predict_on_batch`` (or `forward`) with the batch padded with zero rows to a multiple of `multiple` (a
    data-parallel model splits every batch evenly over its devices), the padding's rows dropped from the answer."""
    forward = forward or model.predict_on_batch

    def predict_batch(batch: np.ndarray) -> np.ndarray:
        missing = (-len(batch)) % multiple
        if missing:
            batch = np.concatenate([batch, np.zeros((missing, *batch.shape[1:]), batch.dtype)])
        return np.asarray(forward(batch))[: len(batch) - missing]

    return predict_batch


def ensemble_weights(members: Sequence[Any], weights: Sequence[float] | None) -> list[float]:
    """`weights` normalised to sum to 1 (default: equal), one per member; a wrong count or a negative one stops."""
    if weights is None:
        return [1.0 / len(members)] * len(members)
    weights = [float(w) for w in weights]
    if len(weights) != len(members) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"{len(members)} models need {len(members)} weights ≥ 0 that are not all 0, got {weights}")
    return [w / sum(weights) for w in weights]


def reorder(wanted: Sequence[str], ids: Sequence[str], *arrays: np.ndarray) -> list[np.ndarray]:
    """`arrays` (rows in `ids` order, as a dataset yielded them: TFRecords come in file order) in `wanted` order;
    an ID missing from `ids` is named."""
    position = {image_id: index for index, image_id in enumerate(ids)}
    missing = [image_id for image_id in wanted if image_id not in position]
    if missing:
        raise ValueError(
            f"the data pipeline returned {len(ids)} images for the {len(wanted)} asked for "
            f"(e.g. {missing[0]} is missing)"
        )
    rows = [position[image_id] for image_id in wanted]
    return [np.asarray(array)[rows] for array in arrays]


def predict(
    model: Any,
    dataset: Iterable,
    tta: bool = False,
    total: int | None = None,
    transforms: Sequence[str] | None = None,
    desc: str = "predicting",
    multiple: int = 1,
    forward: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Run `model` over a batched ``(image, label, id)`` dataset: (IDs, labels [N, 19], probabilities [N, 19]).

    With `tta`, each batch is predicted under every transform in `transforms` (default: all 8
    of `DIHEDRAL_TRANSFORMS`, so 8× the work) and the probabilities are averaged. Batches are padded to a
    multiple of `multiple` rows (the replicas of a data-parallel model). `forward` replaces
    ``model.predict_on_batch`` (a model trained over several hosts: `hpa_nb.training.hosts.predictor`).
    """
    names = transform_names(tta, transforms)
    predict_batch = padded(model, multiple, forward)
    all_ids: list[str] = []
    labels, scores = [], []
    with tqdm(total=total, unit="image", desc=desc + (f" (TTA ×{len(names)})" if tta else "")) as progress:
        for images, batch_labels, batch_ids in dataset:
            batch = np.asarray(images)
            # Plain numpy in, numpy out: the same loop works on every Keras backend.
            probabilities = averaged(predict_batch, batch, names)
            all_ids.extend(
                value.decode() if isinstance(value, bytes) else str(value) for value in np.asarray(batch_ids)
            )
            labels.append(np.asarray(batch_labels, np.float32))
            scores.append(probabilities.astype(np.float32))
            progress.update(len(batch))
    empty = np.zeros((0, N_CLASSES), np.float32)
    return all_ids, np.concatenate(labels) if labels else empty, np.concatenate(scores) if scores else empty
