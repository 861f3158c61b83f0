"""The classical cell segmentation (scipy and scikit-image, no downloads), and the steps every backend shares:
normalising a stain, working at a smaller size and back, and cleaning an instance mask."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


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


def normalise(channel: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the 99.8th percentile, so 8-bit, 16-bit and dim images look alike."""
    top = float(np.percentile(channel, 99.8))
    if top <= 0:
        return np.zeros_like(channel, np.float32)
    return np.clip(channel / top, 0.0, 1.0).astype(np.float32)


def downscale(channel: np.ndarray, work_size: int) -> np.ndarray:
    from skimage.transform import resize  # scikit-image: not on Kaggle's TPU image

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
    from skimage.feature import peak_local_max  # scikit-image: not on Kaggle's TPU image
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
    peaks = peak_local_max(
        distance, min_distance=max(2, int(peak_spacing * radius)), labels=components, exclude_border=False
    )
    markers = np.zeros(blue.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # A component without a peak (a flat plateau) still is a nucleus: seed it whole.
    unseeded = np.setdiff1d(np.arange(1, count + 1), components[tuple(peaks.T)])
    for offset, component in enumerate(unseeded, start=len(peaks) + 1):
        markers[components == component] = offset
    return watershed(-distance, markers, mask=binary)


def segment_classical(red: np.ndarray, blue: np.ndarray, yellow: np.ndarray, settings: ClassicalSettings) -> np.ndarray:
    from skimage.filters import gaussian, threshold_otsu  # scikit-image: not on the TPU image
    from skimage.segmentation import watershed

    shape = red.shape
    blue_small = normalise(downscale(blue, settings.work_size))
    signal = normalise(downscale(red, settings.work_size)) + normalise(downscale(yellow, settings.work_size))
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
