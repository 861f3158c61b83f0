"""Per-cell scores: a confidence for each cell and class, from an image classifier, under a `ScoreRule`.

The competition scores cells, not images, so a submission needs (1) a mask per cell
(`hpa_nb.segmentation`) and (2) a confidence per cell and class (here). Scoring resizes with
TensorFlow's training kernel. A `CellClassifier` is a model's prediction function (a float32 batch
``[N, S, S, C]`` on the 0–255 scale to ``[N, 19]`` probabilities) with the input size and channels
it was trained on; `CellClassifier.from_keras` wraps a Keras model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
from scipy import ndimage

from hpa_nb.labels import N_CLASSES, NEGATIVE
from hpa_nb.segmentation import (ClassicalSettings, colors_needed, image_folder, read_channels, segment,
                                 stack_channels, upscale_labels)


Classifier = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class CellClassifier:
    """A model as the cell scorer uses it: its prediction function and the input it expects.

    ``predict`` maps a float32 batch ``[N, image_size, image_size, len(channels)]`` on the 0–255
    scale to ``[N, 19]`` probabilities; batching large inputs is its job (`from_keras`).
    """

    predict: Classifier
    image_size: int
    channels: str = "rgb"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.predict(batch), np.float32)

    @classmethod
    def from_keras(cls, model, image_size: int, channels: str, batch_size: int = 32) -> "CellClassifier":
        """Wrap a Keras model with sigmoid outputs, run in chunks of ``batch_size``."""
        import keras

        def predict(batch: np.ndarray) -> np.ndarray:
            outputs = [keras.ops.convert_to_numpy(model(batch[start:start + batch_size], training=False))
                       for start in range(0, len(batch), batch_size)]
            return np.concatenate(outputs) if outputs else np.zeros((0, N_CLASSES), np.float32)

        return cls(predict, int(image_size), str(channels))


def _combine_geometric(image: np.ndarray, cell: np.ndarray, image_weight: float) -> np.ndarray:
    return np.power(image, image_weight) * np.power(cell, 1.0 - image_weight)


def _combine_arithmetic(image: np.ndarray, cell: np.ndarray, image_weight: float) -> np.ndarray:
    return image_weight * image + (1.0 - image_weight) * cell


COMBINERS: dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "geometric": _combine_geometric,
    "arithmetic": _combine_arithmetic,
}


def _negative_as_predicted(scores: np.ndarray) -> np.ndarray:
    return scores


def _negative_complement(scores: np.ndarray) -> np.ndarray:
    scores = scores.copy()
    others = np.delete(scores, NEGATIVE, axis=-1).max(axis=-1)
    scores[..., NEGATIVE] = np.maximum(scores[..., NEGATIVE], 1.0 - others)
    return scores


NEGATIVE_RULES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "complement": _negative_complement,
    "model": _negative_as_predicted,
}


@dataclass(frozen=True)
class ScoreRule:
    """How a cell's 19 scores are made from the image-level and the cell-crop probabilities.

    - ``combine``: ``"arithmetic"`` (default) ``w*image + (1-w)*cell``, or ``"geometric"``
      ``image**w * cell**(1-w)`` (either source can veto a class), with ``w = image_weight``
      (default 0.7). ``image_weight=1`` gives every cell its image's probabilities and classifies
      no crops; ``0`` uses the crop alone.
    - ``crop``: what the classifier sees of a cell (`CROPS`). ``"frame"`` (default): the whole
      image resized to the training size with everything but the cell blacked out
      (`frame_crops`), the scale and framing a model trained on whole images knows; ``"tight"``:
      the cell's bounding box, masked, padded to a square and resized to the training size
      (`cell_crops`), for a model trained on cell crops.
    - ``negative``: ``"complement"`` (default) sets a cell's Negative score to
      ``max(Negative, 1 - max(other classes))``: a cell where no class is likely is a Negative
      cell, even if the model (which sees Negative only on whole negative images) did not say so.
      ``"model"`` keeps the combined Negative probability as it is.
    - ``partial_scale``: every score of a partial cell (`partial_cells`: it touches the image's edge
      and has less than half the image's median cell area) is multiplied by this. The host advised
      "if more than half of the cell is not present, don't predict it"; the default 1.0 leaves the
      scores as they are (the README gives the measured effect of lower values).

    With a cell model (`predict_cells`' ``cell_model``), the cell term is that model's score of the
    cell's tile (`cell_crops`, as `hpa_nb.tiles` cut them for training), whatever ``crop`` says.

    The defaults were chosen by comparing these rules' local cell mAP for the quick model on the
    default sample (the README gives the figures). An image-trained model's crop scores are
    noisy, so the image-level probability carries most of the weight; the crop term separates
    cells of one image that carry different labels.
    """

    combine: str = "arithmetic"
    image_weight: float = 0.7
    negative: str = "complement"
    crop: str = "frame"
    partial_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.combine not in COMBINERS:
            raise ValueError(f"combine {self.combine!r} is not one of {sorted(COMBINERS)}")
        if self.negative not in NEGATIVE_RULES:
            raise ValueError(f"negative {self.negative!r} is not one of {sorted(NEGATIVE_RULES)}")
        if self.crop not in CROPS:
            raise ValueError(f"crop {self.crop!r} is not one of {sorted(CROPS)}")
        if not 0.0 <= self.image_weight <= 1.0:
            raise ValueError(f"image_weight {self.image_weight} is outside [0, 1]")
        if not 0.0 <= self.partial_scale <= 1.0:
            raise ValueError(f"partial_scale {self.partial_scale} is outside [0, 1]")

    def apply(self, image_probs: np.ndarray, cell_probs: np.ndarray) -> np.ndarray:
        """Scores ``[N, 19]`` from image probabilities ``[19]`` and cell probabilities ``[N, 19]``."""
        image = np.broadcast_to(np.asarray(image_probs, np.float64), np.shape(cell_probs))
        combined = COMBINERS[self.combine](image, np.asarray(cell_probs, np.float64), self.image_weight)
        return np.clip(NEGATIVE_RULES[self.negative](combined), 0.0, 1.0).astype(np.float32)


def resize_image(image: np.ndarray, image_size: int) -> np.ndarray:
    """``[H, W, C]`` → ``[S, S, C]`` float32 through `hpa_nb.reading.resize`, the training pipeline's kernel."""
    from hpa_nb.reading import resize  # one kernel for training and scoring: no train/test skew

    return resize(np.asarray(image, np.float32), image_size).numpy()


def cell_crops(image: np.ndarray, mask: np.ndarray, image_size: int,
               cell_ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's own crop for the classifier: (cell ids, float32 ``[N, S, S, C]``).

    A crop is the cell's bounding box with every pixel outside the cell set to 0, padded with
    zeros to a centred square (so the cell keeps its aspect ratio), resized to ``image_size``.
    """
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    boxes = ndimage.find_objects(mask.astype(np.int32))
    ids = np.array([i for i in (cell_ids if cell_ids is not None else range(1, len(boxes) + 1))
                    if 0 < i <= len(boxes) and boxes[i - 1] is not None], np.int64)
    crops = np.zeros((len(ids), image_size, image_size, image.shape[-1]), np.float32)
    for row, cell_id in enumerate(ids):
        box = boxes[cell_id - 1]
        crop = image[box] * (mask[box] == cell_id)[..., None]
        height, width = crop.shape[:2]
        side = max(height, width)
        square = np.zeros((side, side, image.shape[-1]), np.float32)
        top, left = (side - height) // 2, (side - width) // 2
        square[top:top + height, left:left + width] = crop
        crops[row] = resize_image(square, image_size)
    return ids, crops


def frame_crops(image: np.ndarray, mask: np.ndarray, image_size: int,
                cell_ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each cell shown alone in the whole image's frame: (cell ids, float32 ``[N, S, S, C]``).

    The image is resized to ``image_size`` once (as for the image-level prediction) and every
    pixel outside the cell is set to 0, so the cell keeps the scale and position a model trained
    on whole images saw during training.
    """
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    ids = cell_ids_of(mask) if cell_ids is None else np.asarray(cell_ids, np.int64)
    small_image = resize_image(image, image_size)
    small_mask = upscale_labels(mask, (image_size, image_size))  # nearest sampling works both ways
    crops = small_image[None] * (small_mask[None] == ids[:, None, None])[..., None]
    return ids, crops.astype(np.float32)


CROPS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "tight": cell_crops,
    "frame": frame_crops,
}


# The image × cell rule (`submit --cell-model`): chosen on the default sample (the README gives the comparison).
COMBINED_RULE = ScoreRule(combine="geometric", image_weight=0.3)


def cell_extent(mask: np.ndarray, cell_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each of `cell_ids`' area in pixels (float ``[N]``) and whether it touches the image's edge (bool ``[N]``)."""
    areas = np.asarray(ndimage.sum_labels(np.ones(mask.shape, np.float32), mask, cell_ids), np.float64).reshape(-1)
    edge = np.unique(np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]]))
    return areas, np.isin(cell_ids, edge)


def partial_cells(mask: np.ndarray, cell_ids: np.ndarray) -> np.ndarray:
    """Which of `cell_ids` look cut off by the image's edge: touching it, with less than half the
    median area of the image's cells. bool ``[N]``."""
    if len(cell_ids) == 0:
        return np.zeros(0, bool)
    areas, border = cell_extent(mask, cell_ids)
    return border & (areas < 0.5 * np.median(areas))


def cell_ids_of(mask: np.ndarray) -> np.ndarray:
    """The instance ids present in a mask, ascending, without 0."""
    ids = np.unique(mask)
    return ids[ids > 0].astype(np.int64)


@dataclass
class CellPredictions:
    """One image's cells and their scores: ``scores[i]`` belongs to cell ``cell_ids[i]`` of ``mask``."""

    mask: np.ndarray  # uint16 [H, W] instance mask at the original size
    cell_ids: np.ndarray  # int64 [N]
    scores: np.ndarray  # float32 [N, 19]
    image_probs: np.ndarray = field(default_factory=lambda: np.zeros(N_CLASSES, np.float32))

    def as_map_input(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The ``(boolean mask, scores[19])`` list that `hpa_nb.metrics.cell_map` takes per image."""
        return [(self.mask == cell_id, scores) for cell_id, scores in zip(self.cell_ids, self.scores)]


def predict_cells(
    classifier: CellClassifier,
    image: np.ndarray,
    mask: np.ndarray,
    rule: ScoreRule = ScoreRule(),
    cell_model: CellClassifier | None = None,
    cell_image: np.ndarray | None = None,
) -> CellPredictions:
    """Score every cell of one image under `rule`.

    ``image`` is ``[H, W, C]`` float32 on the 0–255 scale in the classifier's channel order, at the
    original size; ``mask`` is its instance mask (from `segment`). The classifier sees the whole
    image resized to its input size, then all cells' crops (``CROPS[rule.crop]``) in one call:
    batching is the classifier's job. With a `cell_model` (trained on `hpa_nb.tiles`), the cell
    term is its score of each cell's tile, cut from ``cell_image`` (the image in the cell model's
    channel order; default ``image``). Returns the cells' ids and scores ``[N, 19]``.
    """
    ids = cell_ids_of(mask)
    size = classifier.image_size
    image_probs = classifier(resize_image(image, size)[None])[0] if rule.image_weight > 0 \
        else np.ones(N_CLASSES, np.float32)
    if len(ids) == 0:
        return CellPredictions(mask, ids, np.zeros((0, N_CLASSES), np.float32), image_probs)
    if rule.image_weight < 1 and cell_model is not None:
        _, tiles = cell_crops(image if cell_image is None else cell_image, mask, cell_model.image_size, ids)
        crop_probs = cell_model(tiles)
    elif rule.image_weight < 1:
        # All crops at once: the image and mask are resized (or boxed) once, not once per batch.
        _, crops = CROPS[rule.crop](image, mask, size, ids)
        crop_probs = classifier(crops)
    else:
        crop_probs = np.ones((len(ids), N_CLASSES), np.float32)
    scores = rule.apply(image_probs, crop_probs)
    if rule.partial_scale < 1:
        scores[partial_cells(mask, ids)] *= np.float32(rule.partial_scale)
    return CellPredictions(mask, ids, scores, image_probs)


def predict_image(
    classifier: CellClassifier,
    folder: Path,
    image_id: str,
    method: str = "classical",
    rule: ScoreRule = ScoreRule(),
    mask: np.ndarray | None = None,
    settings: ClassicalSettings = ClassicalSettings(),
    cell_model: CellClassifier | None = None,
    **method_options,
) -> CellPredictions:
    """Read ``folder/{ID}_*.png``, segment it (unless ``mask`` is given) and score its cells."""
    channels = [classifier.channels] + ([cell_model.channels] if cell_model is not None else [])
    pixels = read_channels(folder, image_id, colors_needed(*channels))
    if mask is None:
        mask = segment(pixels["red"], pixels["blue"], pixels["yellow"], method, settings, **method_options)
    cell_image = stack_channels(pixels, cell_model.channels) if cell_model is not None else None
    return predict_cells(classifier, stack_channels(pixels, classifier.channels), mask, rule, cell_model, cell_image)


def iter_predictions(
    classifier: CellClassifier,
    data_dir: Path,
    ids: Sequence[str],
    method: str = "classical",
    rule: ScoreRule = ScoreRule(),
    masks: Mapping[str, np.ndarray] | None = None,
    progress: bool = True,
    folder: Path | None = None,
    **options,
) -> Iterator[tuple[str, CellPredictions]]:
    """``(ID, CellPredictions)`` for each image of ``data_dir/train`` or ``data_dir/test`` (or of
    ``folder``, where given), in order.

    Each image is segmented once by ``method``, unless ``masks`` (``{ID: mask}``, e.g. the true
    cells of `load_cell_truth`) holds its mask. Images are read one at a time, so a caller that
    writes each result away holds one image at once.
    """
    from tqdm import tqdm  # plain text bars: the same in a terminal, a notebook and a Kaggle log

    for image_id in tqdm(ids, desc="cells", unit="image", disable=not progress):
        mask = masks[image_id] if masks is not None else None
        source = folder if folder is not None else image_folder(data_dir, image_id)
        yield image_id, predict_image(classifier, source, image_id, method, rule, mask=mask, **options)


def predict_images(classifier: CellClassifier, data_dir: Path, ids: Sequence[str], method: str = "classical",
                   rule: ScoreRule = ScoreRule(), masks: Mapping[str, np.ndarray] | None = None,
                   progress: bool = True, **options) -> dict[str, CellPredictions]:
    """`iter_predictions` kept as ``{ID: CellPredictions}`` in ``ids`` order, for a notebook to reuse.

    Every mask is kept at its image's size (2 bytes a pixel: 8 MiB for a 2048 px image). Feed
    ``{ID: p.as_map_input()}`` to `hpa_nb.metrics.cell_map`.
    """
    return dict(iter_predictions(classifier, data_dir, ids, method, rule, masks, progress, **options))
