"""Cells: instance segmentation of an HPA image and a score for each cell and class.

The competition scores cells, not images, so a submission needs (1) a mask per cell and
(2) a confidence per cell and class. This module gives both:

- `segment(red, blue, yellow)`: a uint16 instance mask at the image's original size.
  ``method="classical"`` (default, scikit-image only, no downloads) or ``"hpacellseg"``
  (the HPA-Cell-Segmentation package, when it and its weights are attached).
- `predict_cells(classifier, channels, mask, ...)`: per-cell scores under a `ScoreRule`.
- `segmentation_quality(...)`: how well a segmentation matches ground-truth instances.
- `overlay_cells` / `plot_cells`: notebook views of a segmentation and of per-cell predictions.

Segmentation needs only scikit-image. Scoring resizes with TensorFlow (as training does), and
a classifier is any function from a float32 batch ``[N, S, S, C]`` on the 0–255 scale to
``[N, 19]`` probabilities (`keras_classifier` wraps a Keras model).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from hpa_nb.labels import COLORS, LABEL_NAMES, N_CLASSES, NEGATIVE, colors_of, parse_label


Classifier = Callable[[np.ndarray], np.ndarray]


# --- reading images ---------------------------------------------------------------------
def read_channel(path: Path) -> np.ndarray:
    """One greyscale PNG (8- or 16-bit) as float32 on the 0–255 scale."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    with Image.open(path) as image:
        pixels = np.asarray(image)
    if pixels.ndim != 2:
        raise ValueError(f"image {path} is not greyscale (shape {pixels.shape})")
    scale = 255.0 / 65535.0 if pixels.dtype.itemsize > 1 else 1.0
    return pixels.astype(np.float32) * np.float32(scale)


def read_channels(folder: Path, image_id: str, colors: Iterable[str] = COLORS) -> dict[str, np.ndarray]:
    """``{color: float32 [H, W]}`` for ``folder/{image_id}_{color}.png``, all of one size."""
    folder = Path(folder)
    channels = {color: read_channel(folder / f"{image_id}_{color}.png") for color in colors}
    # Checked here, once, so a mismatch names its file instead of failing later inside np.stack.
    first = next(iter(channels), None)
    for color, pixels in channels.items():
        if pixels.shape != channels[first].shape:
            (height, width), (first_height, first_width) = pixels.shape, channels[first].shape
            raise ValueError(f"image {image_id}: {folder / f'{image_id}_{color}.png'} is {width}×{height} px, "
                             f"but {image_id}_{first}.png is {first_width}×{first_height} px")
    return channels


def stack_channels(channels: Mapping[str, np.ndarray], channel_mode: str) -> np.ndarray:
    """The model's input layout: ``[H, W, C]`` in the order of `hpa_nb.labels.CHANNEL_SETS`."""
    return np.stack([channels[color] for color in colors_of(channel_mode)], axis=-1)


def colors_needed(channels: str) -> list[str]:
    """The stains one prediction reads: the model's channels plus red, blue and yellow for segmentation."""
    return sorted(set(colors_of(channels)) | {"red", "blue", "yellow"}, key=COLORS.index)


# --- segmentation -----------------------------------------------------------------------
@dataclass(frozen=True)
class ClassicalSettings:
    """Knobs of the classical segmentation; the defaults were tuned on the default sample.

    Sizes are relative to the working resolution, so the same settings serve a 256 px
    sample and a 3072 px competition image.
    """

    work_size: int = 512  # longest side the work is done at; labels are upscaled (nearest) afterwards
    nucleus_sigma: float = 1 / 256  # blue smoothing, as a fraction of the working side
    cell_sigma: float = 1 / 256  # red+yellow smoothing, as a fraction of the working side
    foreground_factor: float = 0.6  # cell foreground: smoothed red+yellow above this × its Otsu threshold
    peak_spacing: float = 0.7  # nucleus seeds at least this × the median nucleus radius apart
    signal_weight: float = 1.0  # pull of dim red+yellow seams on cell borders, against distance to nuclei
    min_area_fraction: float = 0.2  # cells smaller than this × the median cell area are fragments: dropped
    border: str = "keep"  # "keep" cells touching the image edge, or "drop" them (see `segment`)


def segment(
    red: np.ndarray,
    blue: np.ndarray,
    yellow: np.ndarray,
    method: str = "classical",
    settings: ClassicalSettings = ClassicalSettings(),
    **method_options,
) -> np.ndarray:
    """Segment one image into cells: a uint16 instance mask at the input's size, 0 = background.

    ``red`` (microtubules), ``blue`` (nucleus) and ``yellow`` (ER) are 2-D arrays of one
    image on any scale (8- or 16-bit values, or the 0–255 floats of `read_channels`).

    Methods (``SEGMENTERS``):

    - ``"classical"`` (default, scikit-image, no downloads): at a working resolution of at most
      ``settings.work_size`` px, nuclei come from the blue channel (Gaussian smoothing, Otsu
      threshold, distance-transform watershed); each nucleus seeds a watershed inside a foreground
      of smoothed red+yellow above ``foreground_factor`` × its Otsu threshold, flooding an
      elevation of distance to the nearest nucleus minus ``signal_weight`` × the red+yellow
      signal. So every cell has exactly one nucleus, and touching cells split about half-way
      between their nuclei, bent towards dim seams. On the default sample: mean matched IoU
      0.892 with 96.8% of 1421 cells found (train), 0.897 / 98.0% of 101 (test).
    - ``"hpacellseg"``: HPA-Cell-Segmentation's ``CellSegmentator`` (the method most top
      solutions used). Needs the ``hpacellseg`` package and its two weight files, passed as
      ``nuclei_model=`` and ``cell_model=`` or found in ``$HPA_CELLSEG_WEIGHTS``
      (``nuclei-model.pth``, ``cell-model.pth``); nothing is downloaded. ``device="cuda"`` (the
      package falls back to the CPU without a GPU), ``scale_factor=0.25``.

    Rule for edges and fragments (both methods): a cell smaller than ``min_area_fraction``
    (default 0.2) of the image's median cell area is a fragment (a split nucleus, debris) and is
    dropped. Cells touching the image border are kept by default: ground truth that annotates
    partial cells at the edge (the sample's does) is matched only if they are predicted, and an
    unpredicted cell costs recall in every class it carries, while a border prediction that
    matches nothing costs only a little precision. On the default sample dropping them finds
    35.5% of the cells instead of 96.8%. ``ClassicalSettings(border="drop")`` removes them.
    Labels are renumbered 1..N in raster order of their first pixel.
    """
    if method not in SEGMENTERS:
        raise ValueError(f"segmentation method {method!r} is not one of {sorted(SEGMENTERS)}")
    if settings.border not in ("keep", "drop"):
        raise ValueError(f"border {settings.border!r} is not 'keep' or 'drop'")
    shapes = {np.shape(red), np.shape(blue), np.shape(yellow)}
    if len(shapes) != 1 or len(np.shape(red)) != 2:
        raise ValueError(f"red, blue and yellow must be 2-D arrays of one shape, got {sorted(shapes)}")
    labels = SEGMENTERS[method](
        np.asarray(red, np.float32), np.asarray(blue, np.float32), np.asarray(yellow, np.float32),
        settings, **method_options,
    )
    labels = clean_labels(labels, settings.min_area_fraction, drop_border=settings.border == "drop")
    return labels.astype(np.uint16)


def _normalise(channel: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the 99.8th percentile, so 8-bit, 16-bit and dim images look alike."""
    top = float(np.percentile(channel, 99.8))
    if top <= 0:
        return np.zeros_like(channel, np.float32)
    return np.clip(channel / top, 0.0, 1.0).astype(np.float32)


def _downscale(channel: np.ndarray, work_size: int) -> np.ndarray:
    from skimage.transform import resize

    height, width = channel.shape
    scale = min(1.0, work_size / max(height, width))
    if scale >= 1.0:
        return channel
    shape = (max(1, round(height * scale)), max(1, round(width * scale)))
    return resize(channel, shape, order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)


def upscale_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an instance mask (labels must never be interpolated)."""
    if labels.shape == tuple(shape):
        return labels
    rows = np.minimum((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0], labels.shape[0] - 1).astype(np.intp)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1], labels.shape[1] - 1).astype(np.intp)
    return labels[rows[:, None], cols[None, :]]


def segment_nuclei(blue: np.ndarray, sigma: float, peak_spacing: float) -> np.ndarray:
    """Nuclei instances from a normalised blue channel: smoothing, Otsu, distance-transform watershed."""
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.segmentation import watershed

    smooth = gaussian(blue, sigma=sigma, preserve_range=True)
    if smooth.max() <= smooth.min():
        return np.zeros(blue.shape, np.int32)
    binary = ndimage.binary_fill_holes(smooth > threshold_otsu(smooth))
    components, count = ndimage.label(binary)
    if count == 0:
        return components
    areas = np.bincount(components.ravel())[1:]
    # Touching nuclei share one component; seeds closer than a fraction of a typical radius
    # would split one nucleus in two, so the spacing follows the median component size.
    radius = np.sqrt(np.median(areas) / np.pi)
    distance = ndimage.distance_transform_edt(binary)
    distance = gaussian(distance, sigma=max(1.0, radius / 8), preserve_range=True)
    peaks = peak_local_max(distance, min_distance=max(2, int(peak_spacing * radius)), labels=components,
                           exclude_border=False)
    markers = np.zeros(blue.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # A component without a peak (a flat plateau) still is a nucleus: seed it whole.
    unseeded = np.setdiff1d(np.arange(1, count + 1), components[tuple(peaks.T)])
    for offset, component in enumerate(unseeded, start=len(peaks) + 1):
        markers[components == component] = offset
    return watershed(-distance, markers, mask=binary)


def _segment_classical(red: np.ndarray, blue: np.ndarray, yellow: np.ndarray,
                       settings: ClassicalSettings) -> np.ndarray:
    from skimage.filters import gaussian, threshold_otsu
    from skimage.segmentation import watershed

    shape = red.shape
    blue_small = _normalise(_downscale(blue, settings.work_size))
    signal = _normalise(_downscale(red, settings.work_size)) + _normalise(_downscale(yellow, settings.work_size))
    side = max(blue_small.shape)
    nuclei = segment_nuclei(blue_small, settings.nucleus_sigma * side, settings.peak_spacing)
    if nuclei.max() == 0:
        return np.zeros(shape, np.int32)
    signal = gaussian(signal, sigma=max(0.5, settings.cell_sigma * side), preserve_range=True)
    threshold = threshold_otsu(signal) if signal.max() > signal.min() else 0.0
    foreground = ndimage.binary_fill_holes((signal > settings.foreground_factor * threshold) | (nuclei > 0))
    # Flooding starts at the nuclei (the lowest elevation: nuclei are dark in red/yellow, and a seed
    # left on a ridge would be swallowed by its neighbours). Elsewhere the elevation is the distance to the
    # nearest nucleus, in median nucleus radii, minus `signal_weight` × the normalised cytoplasm
    # signal: neighbouring cells meet half-way between their nuclei, bent towards dim seams.
    radius = np.sqrt(np.median(np.bincount(nuclei.ravel())[1:]) / np.pi)
    distance = ndimage.distance_transform_edt(nuclei == 0) / max(radius, 1.0)
    elevation = distance - settings.signal_weight * signal / max(float(signal.max()), 1e-6)
    elevation[nuclei > 0] = elevation.min() - 1.0
    cells = watershed(elevation, nuclei, mask=foreground)
    return upscale_labels(cells, shape)


class SegmentationUnavailableError(ImportError, ValueError):
    """A segmentation method's package is missing; a ValueError too, so the CLI prints one line."""


_SEGMENTATORS: dict[tuple[str, str, str, float], object] = {}


def _segment_hpacellseg(red: np.ndarray, blue: np.ndarray, yellow: np.ndarray, settings: ClassicalSettings,
                        nuclei_model: str | None = None, cell_model: str | None = None,
                        device: str = "cuda", scale_factor: float = 0.25) -> np.ndarray:
    try:
        from hpacellseg.cellsegmentator import CellSegmentator
        from hpacellseg.utils import label_cell
    except ImportError:
        raise SegmentationUnavailableError(
            "segmentation method 'hpacellseg' needs the hpacellseg package (HPA-Cell-Segmentation); "
            "attach it as a Kaggle dataset and pip-install it from there, or use method='classical'"
        ) from None
    weights = Path(os.environ.get("HPA_CELLSEG_WEIGHTS", "."))
    nuclei_path = Path(nuclei_model) if nuclei_model else weights / "nuclei-model.pth"
    cell_path = Path(cell_model) if cell_model else weights / "cell-model.pth"
    for path in (nuclei_path, cell_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"hpacellseg weights {path} not found: pass nuclei_model=/cell_model= or set HPA_CELLSEG_WEIGHTS"
            )
    key = (str(nuclei_path), str(cell_path), device, float(scale_factor))
    if key not in _SEGMENTATORS:  # loading the two U-Nets takes seconds: once per process
        _SEGMENTATORS[key] = CellSegmentator(str(nuclei_path), str(cell_path), scale_factor=scale_factor,
                                             device=device, padding=True, multi_channel_model=True)
    segmentator = _SEGMENTATORS[key]
    as_8bit = [(_normalise(channel) * 255).astype(np.uint8) for channel in (red, yellow, blue)]
    nuclei = segmentator.pred_nuclei([as_8bit[2]])[0]
    cells = segmentator.pred_cells([[as_8bit[0]], [as_8bit[1]], [as_8bit[2]]])[0]
    _, cell_mask = label_cell(nuclei, cells)
    return upscale_labels(np.asarray(cell_mask, np.int32), red.shape)


SEGMENTERS: dict[str, Callable[..., np.ndarray]] = {
    "classical": _segment_classical,
    "hpacellseg": _segment_hpacellseg,
}


def clean_labels(labels: np.ndarray, min_area_fraction: float, drop_border: bool = False) -> np.ndarray:
    """Drop fragments (and optionally border cells) and renumber 1..N in raster order."""
    labels = np.asarray(labels)
    if labels.max() == 0:
        return labels.astype(np.int32)
    areas = np.bincount(labels.ravel())
    present = np.flatnonzero(areas)
    present = present[present > 0]
    keep = np.zeros(len(areas), bool)
    keep[present] = areas[present] >= min_area_fraction * np.median(areas[present])
    if drop_border:
        edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        keep[edge] = False
    keep[0] = False
    kept = np.where(keep[labels], labels, 0)
    # np.unique sorts by id; remap to raster order of first appearance so ids are stable and readable.
    flat = kept.ravel()
    ids, first = np.unique(flat, return_index=True)
    order = ids[ids > 0][np.argsort(first[ids > 0])]
    lookup = np.zeros(len(areas), np.int32)
    lookup[order] = np.arange(1, len(order) + 1)
    return lookup[kept]


# --- segmentation quality ---------------------------------------------------------------
def iou_table(predicted: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predicted ids, truth ids, IoU [P, T]) between two instance masks of one shape."""
    if predicted.shape != truth.shape:
        raise ValueError(f"masks differ in shape: {predicted.shape} vs {truth.shape}")
    predicted_ids, predicted_index = np.unique(predicted, return_inverse=True)
    truth_ids, truth_index = np.unique(truth, return_inverse=True)
    pairs = np.bincount(predicted_index.ravel() * len(truth_ids) + truth_index.ravel(),
                        minlength=len(predicted_ids) * len(truth_ids)).reshape(len(predicted_ids), len(truth_ids))
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
        return SegmentationScore(self.truth_cells + other.truth_cells, self.predicted_cells + other.predicted_cells,
                                 self.matched + other.matched, self.iou_sum + other.iou_sum, self.threshold)

    def __str__(self) -> str:
        return (f"mean matched IoU {self.mean_iou:.3f}, found {self.recall:.1%} of {self.truth_cells} cells, "
                f"precision {self.precision:.1%} (IoU ≥ {self.threshold})")


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


def read_mask(data_dir: Path, image_id: str) -> np.ndarray:
    """The ground-truth instance mask ``masks/{ID}.png`` of a sample (uint16, 0 = background)."""
    from PIL import Image

    path = Path(data_dir) / "masks" / f"{image_id}.png"
    if not path.is_file():
        raise FileNotFoundError(f"mask {path} does not exist (only the synthetic sample has ground-truth masks)")
    with Image.open(path) as image:
        return np.asarray(image).astype(np.uint16)


def image_folder(data_dir: Path, image_id: str) -> Path:
    """``train/`` or ``test/``, whichever holds the image's red PNG."""
    for subset in ("train", "test"):
        folder = Path(data_dir) / subset
        if (folder / f"{image_id}_red.png").is_file():
            return folder
    raise FileNotFoundError(f"image {image_id}: no {image_id}_red.png under {data_dir}/train or {data_dir}/test")


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
    from tqdm import tqdm  # plain text bars: the same in a terminal, a notebook and a Kaggle log

    total = SegmentationScore(0, 0, 0, 0.0, threshold)
    for image_id in tqdm(ids, desc="segment", disable=not progress):
        channels = read_channels(image_folder(data_dir, image_id), image_id, ("red", "blue", "yellow"))
        predicted = segment(channels["red"], channels["blue"], channels["yellow"], method, settings, **method_options)
        total = total + score_segmentation(predicted, read_mask(data_dir, image_id), threshold)
    return total


# --- ground truth -----------------------------------------------------------------------
def load_cell_truth(data_dir: Path, ids: Sequence[str] | None = None
                    ) -> tuple[dict[str, np.ndarray], dict[str, dict[int, np.ndarray]]]:
    """Ground truth of the sample for `hpa_nb.metrics.cell_map`: (masks, labels).

    ``masks[ID]`` is the uint16 instance mask ``masks/{ID}.png``; ``labels[ID][cell_id]`` is the
    cell's float32 multi-hot vector of 19 from ``cells.csv`` (columns ID, CellID, Label).
    """
    import pandas as pd

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


# --- per-cell scores --------------------------------------------------------------------
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

    The defaults come from the quick model on the default sample (cell mAP on the 16 test /
    40 validation images): image only 0.463 / 0.355, crops only (tight) 0.362 / 0.279,
    geometric 0.5 tight 0.396 / 0.309, arithmetic 0.7 frame 0.467 / 0.345. An image-trained
    model's crop scores are noisy, so the image-level probability carries most of the weight;
    the crop term separates cells of one image that carry different labels.
    """

    combine: str = "arithmetic"
    image_weight: float = 0.7
    negative: str = "complement"
    crop: str = "frame"

    def __post_init__(self) -> None:
        if self.combine not in COMBINERS:
            raise ValueError(f"combine {self.combine!r} is not one of {sorted(COMBINERS)}")
        if self.negative not in NEGATIVE_RULES:
            raise ValueError(f"negative {self.negative!r} is not one of {sorted(NEGATIVE_RULES)}")
        if self.crop not in CROPS:
            raise ValueError(f"crop {self.crop!r} is not one of {sorted(CROPS)}")
        if not 0.0 <= self.image_weight <= 1.0:
            raise ValueError(f"image_weight {self.image_weight} is outside [0, 1]")

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
    classifier: Classifier,
    image: np.ndarray,
    mask: np.ndarray,
    image_size: int,
    rule: ScoreRule = ScoreRule(),
) -> CellPredictions:
    """Score every cell of one image under `rule`.

    ``image`` is ``[H, W, C]`` float32 on the 0–255 scale in the model's channel order, at the
    original size; ``mask`` is its instance mask (from `segment`). The classifier sees the
    whole image resized to ``image_size``, then all cells' crops (``CROPS[rule.crop]``) in one
    call: batching is the classifier's job (`keras_classifier`). Returns the cells' ids and
    scores ``[N, 19]``.
    """
    ids = cell_ids_of(mask)
    image_probs = np.asarray(classifier(resize_image(image, image_size)[None]), np.float32)[0] \
        if rule.image_weight > 0 else np.ones(N_CLASSES, np.float32)
    if len(ids) == 0:
        return CellPredictions(mask, ids, np.zeros((0, N_CLASSES), np.float32), image_probs)
    if rule.image_weight < 1:
        # All crops at once: the image and mask are resized (or boxed) once, not once per batch.
        _, crops = CROPS[rule.crop](image, mask, image_size, ids)
        crop_probs = np.asarray(classifier(crops), np.float32)
    else:
        crop_probs = np.ones((len(ids), N_CLASSES), np.float32)
    return CellPredictions(mask, ids, rule.apply(image_probs, crop_probs), image_probs)


def keras_classifier(model, batch_size: int = 32) -> Classifier:
    """Wrap a Keras model (sigmoid outputs) as a `Classifier` that runs in chunks of `batch_size`."""
    import keras

    def classify(batch: np.ndarray) -> np.ndarray:
        outputs = [keras.ops.convert_to_numpy(model(batch[start:start + batch_size], training=False))
                   for start in range(0, len(batch), batch_size)]
        return np.concatenate(outputs).astype(np.float32) if outputs else np.zeros((0, N_CLASSES), np.float32)

    return classify


def predict_image(
    classifier: Classifier,
    folder: Path,
    image_id: str,
    image_size: int,
    channels: str = "rgb",
    method: str = "classical",
    rule: ScoreRule = ScoreRule(),
    mask: np.ndarray | None = None,
    settings: ClassicalSettings = ClassicalSettings(),
    **method_options,
) -> CellPredictions:
    """Read ``folder/{ID}_*.png``, segment it (unless ``mask`` is given) and score its cells."""
    pixels = read_channels(folder, image_id, colors_needed(channels))
    if mask is None:
        mask = segment(pixels["red"], pixels["blue"], pixels["yellow"], method, settings, **method_options)
    return predict_cells(classifier, stack_channels(pixels, channels), mask, image_size, rule)


def predict_images(
    classifier: Classifier,
    data_dir: Path,
    ids: Sequence[str],
    image_size: int,
    channels: str = "rgb",
    method: str = "classical",
    rule: ScoreRule = ScoreRule(),
    use_truth_masks: bool = False,
    progress: bool = True,
    masks: Mapping[str, np.ndarray] | None = None,
    **options,
) -> dict[str, CellPredictions]:
    """`predict_image` over many sample images (train or test); ``use_truth_masks`` skips segmentation.

    The truth masks come from ``masks`` (``{ID: mask}``, e.g. from `load_cell_truth`) or else ``masks/{ID}.png``.

    Feed ``{ID: p.as_map_input()}`` of the result to `hpa_nb.metrics.cell_map`.
    """
    from tqdm import tqdm  # plain text bars: the same in a terminal, a notebook and a Kaggle log

    results: dict[str, CellPredictions] = {}
    for image_id in tqdm(ids, desc="cells", disable=not progress):
        mask = None
        if use_truth_masks:
            mask = masks[image_id] if masks is not None else read_mask(data_dir, image_id)
        results[image_id] = predict_image(classifier, image_folder(data_dir, image_id), image_id, image_size,
                                          channels, method, rule, mask=mask, **options)
    return results


# --- notebook views ---------------------------------------------------------------------
def composite(channels: Mapping[str, np.ndarray]) -> np.ndarray:
    """An RGB uint8 view of an HPA image: red + yellow as red/orange, green, blue nucleus."""
    red = _normalise(channels["red"])
    yellow = _normalise(channels["yellow"]) if "yellow" in channels else np.zeros_like(red)
    green = _normalise(channels["green"]) if "green" in channels else np.zeros_like(red)
    blue = _normalise(channels["blue"])
    rgb = np.stack([np.clip(red + yellow, 0, 1), np.clip(green + 0.5 * yellow, 0, 1), blue], axis=-1)
    return (rgb * 255).astype(np.uint8)


def overlay_cells(rgb: np.ndarray, mask: np.ndarray, color: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """The image with each cell's outline drawn on it (uint8 RGB)."""
    from skimage.segmentation import find_boundaries

    out = np.array(rgb, np.uint8, copy=True)
    edges = find_boundaries(mask, mode="inner")
    out[edges] = (np.asarray(color) * 255).astype(np.uint8)
    return out


def plot_cells(
    channels: Mapping[str, np.ndarray],
    mask: np.ndarray,
    predictions: CellPredictions | None = None,
    truth: np.ndarray | None = None,
    top: int = 2,
    ax=None,
    title: str = "",
):
    """Show an image with its cell outlines (white) and, if given, truth outlines (cyan) and each
    cell's ``top`` classes with their scores written at its centre. Returns the matplotlib Axes.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 6))
    view = composite(channels)
    if truth is not None:
        view = overlay_cells(view, truth, (0.0, 1.0, 1.0))
    ax.imshow(overlay_cells(view, mask))
    if predictions is not None and len(predictions.cell_ids):
        centres = ndimage.center_of_mass(np.ones(mask.shape), mask, predictions.cell_ids)
        for (row, col), scores in zip(centres, predictions.scores):
            best = np.argsort(-scores)[:top]
            text = "\n".join(f"{LABEL_NAMES[c][:14]} {scores[c]:.2f}" for c in best)
            ax.text(col, row, text, color="white", fontsize=7, ha="center", va="center",
                    bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})
    ax.set_title(title or f"{len(cell_ids_of(mask))} cells")
    ax.axis("off")
    return ax


def overlay_figure(data_dir: Path, ids: Sequence[str], classifier: Classifier | None = None,
                   image_size: int | None = None, channels: str = "rgb", rule: ScoreRule = ScoreRule(),
                   method: str = "classical", top: int = 2):
    """One column per image: the segmentation (white outlines; ground truth in cyan where the sample has
    masks) and, given a classifier, each cell's `top` classes and confidences underneath.
    """
    from matplotlib.figure import Figure

    from hpa_nb.figures import FIGURE_DPI, show_figures_inline

    show_figures_inline()
    rows = 2 if classifier is not None else 1
    figure = Figure(figsize=(5.0 * len(ids), 5.0 * rows), layout="constrained", dpi=FIGURE_DPI)
    axes = figure.subplots(rows, len(ids), squeeze=False)
    for column, image_id in enumerate(ids):
        pixels = read_channels(image_folder(data_dir, image_id), image_id)
        mask = segment(pixels["red"], pixels["blue"], pixels["yellow"], method=method)
        has_truth = (Path(data_dir) / "masks" / f"{image_id}.png").is_file()
        truth = read_mask(data_dir, image_id) if has_truth else None
        title = f"{image_id[:8]}: {len(cell_ids_of(mask))} cells found"
        if truth is not None:
            title += f", {len(cell_ids_of(truth))} true"
        plot_cells(pixels, mask, truth=truth, ax=axes[0, column], title=title)
        if classifier is not None:
            predictions = predict_cells(classifier, stack_channels(pixels, channels), mask, image_size, rule)
            plot_cells(pixels, mask, predictions, top=top, ax=axes[1, column], title="top classes per cell")
    return figure
