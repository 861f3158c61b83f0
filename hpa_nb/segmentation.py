"""Cell instance segmentation of an HPA image: `segment(red, blue, yellow)` gives a uint16 mask at the
image's original size, by the classical method (scikit-image only, no downloads) or by the host's
HPA-Cell-Segmentation package when it and its weights are attached; plus reading an image's channels."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
from scipy import ndimage

from hpa_nb.labels import COLORS, colors_of


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


def colors_needed(*channels: str) -> list[str]:
    """The stains one prediction reads: the models' channels plus red, blue and yellow for segmentation."""
    return sorted({color for mode in channels for color in colors_of(mode)} | {"red", "blue", "yellow"},
                  key=COLORS.index)


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
      between their nuclei, bent towards dim seams. The README gives its quality on the default
      sample.
    - ``"hpacellseg"``: HPA-Cell-Segmentation's ``CellSegmentator`` (the method most top
      solutions used). Needs torch, and the package, its fork and its two weight files: passed as
      ``nuclei_model=`` and ``cell_model=``, or found (`hpa_nb.hpacellseg_offline`) in
      ``hpacellseg_dir=``, ``$HPA_CELLSEG_DIR``, /kaggle/input on Kaggle or the current folder;
      nothing is downloaded. ``device="cuda"`` (the CPU when there is no GPU),
      ``scale_factor=0.25``, ``work_size=None`` (or e.g. 512: the image is resized to that side
      first, the fast variant). `hpa_nb.hpacellseg` runs the package with today's torch, numpy and
      scikit-image.

    Rule for edges and fragments (both methods): a cell smaller than ``min_area_fraction``
    (default 0.2) of the image's median cell area is a fragment (a split nucleus, debris) and is
    dropped. Cells touching the image border are kept by default: ground truth that annotates
    partial cells at the edge (the sample's does) is matched only if they are predicted, and an
    unpredicted cell costs recall in every class it carries, while a border prediction that
    matches nothing costs only a little precision. ``ClassicalSettings(border="drop")`` removes them.
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


def normalise(channel: np.ndarray) -> np.ndarray:
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
    blue_small = normalise(_downscale(blue, settings.work_size))
    signal = normalise(_downscale(red, settings.work_size)) + normalise(_downscale(yellow, settings.work_size))
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
    """A segmentation method's package (or torch, or hpacellseg's pytorch_zoo fork) is missing or the wrong
    one; a ValueError too, so the CLI prints one line. `hpa_nb.hpacellseg` raises it."""


_SEGMENTATORS: dict[tuple, object] = {}


def _segment_hpacellseg(red: np.ndarray, blue: np.ndarray, yellow: np.ndarray, settings: ClassicalSettings,
                        hpacellseg_dir: str | None = None, nuclei_model: str | None = None,
                        cell_model: str | None = None, device: str = "cuda", scale_factor: float = 0.25,
                        work_size: int | None = None) -> np.ndarray:
    # torch and the package are imported there, with clear errors
    from hpa_nb.hpacellseg import HpaCellSegmenter, require_torch
    from hpa_nb.hpacellseg_offline import resolve, search_root

    require_torch()  # the first thing missing, if it is
    explicit = bool(nuclei_model and cell_model)
    where = None if explicit else search_root(hpacellseg_dir)[0].resolve()
    key = (where, str(nuclei_model), str(cell_model), device, float(scale_factor), work_size)
    if key not in _SEGMENTATORS:  # finding the files and loading the two U-Nets take seconds: once per process
        if not explicit:
            sources = resolve(hpacellseg_dir)
            nuclei_model, cell_model = sources.nuclei_model, sources.cell_model
        _SEGMENTATORS[key] = HpaCellSegmenter(nuclei_model, cell_model, device, work_size, scale_factor)
    return _SEGMENTATORS[key](red, blue, yellow)


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
