"""Cell segmentation by name: `segment(red, blue, yellow, method)` gives a uint16 instance mask at the image's
size from one of the backends in `SEGMENTERS`, then applies the rule for fragments and edges they all share."""

from __future__ import annotations

from typing import Callable

import numpy as np

from hpa_nb.segmentation import hpacellseg, offline
from hpa_nb.segmentation.classical import ClassicalSettings, clean_labels, segment_classical


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
      between their nuclei, bent towards dim seams. The docs give its quality on the default
      sample.
    - ``"hpacellseg"``: HPA-Cell-Segmentation's ``CellSegmentator`` (the method most top
      solutions used). Needs torch, and the package, its fork and its two weight files: passed as
      ``nuclei_model=`` and ``cell_model=``, or found (`hpa_nb.segmentation.offline`) in
      ``hpacellseg_dir=``, ``$HPA_CELLSEG_DIR``, /kaggle/input on Kaggle or the current folder;
      nothing is downloaded. ``device="cuda"`` (the CPU when there is no GPU),
      ``scale_factor=0.25``, ``work_size=None`` (or e.g. 512: the image is resized to that side
      first, the fast variant). `hpa_nb.segmentation.hpacellseg` runs the package with today's torch, numpy and
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
        np.asarray(red, np.float32),
        np.asarray(blue, np.float32),
        np.asarray(yellow, np.float32),
        settings,
        **method_options,
    )
    labels = clean_labels(labels, settings.min_area_fraction, drop_border=settings.border == "drop")
    return labels.astype(np.uint16)


_SEGMENTATORS: dict[tuple, object] = {}


def _segment_hpacellseg(
    red: np.ndarray,
    blue: np.ndarray,
    yellow: np.ndarray,
    settings: ClassicalSettings,
    hpacellseg_dir: str | None = None,
    nuclei_model: str | None = None,
    cell_model: str | None = None,
    device: str = "cuda",
    scale_factor: float = 0.25,
    work_size: int | None = None,
) -> np.ndarray:
    hpacellseg.require_torch()  # the first thing missing, if it is
    explicit = bool(nuclei_model and cell_model)
    where = None if explicit else offline.search_root(hpacellseg_dir)[0].resolve()
    key = (where, str(nuclei_model), str(cell_model), device, float(scale_factor), work_size)
    if key not in _SEGMENTATORS:  # finding the files and loading the two U-Nets take seconds: once per process
        if not explicit:
            sources = offline.resolve(hpacellseg_dir)
            nuclei_model, cell_model = sources.nuclei_model, sources.cell_model
        _SEGMENTATORS[key] = hpacellseg.HpaCellSegmenter(nuclei_model, cell_model, device, work_size, scale_factor)
    return _SEGMENTATORS[key](red, blue, yellow)


def on_accelerator(method: str, method_options: dict) -> bool:
    """Whether `method` segments on a GPU here (HPA-Cell-Segmentation with CUDA): then one process segments, the
    GPU's one place, rather than a worker per core each loading the U-Nets onto it."""
    if method != "hpacellseg" or method_options.get("device", "cuda") == "cpu":
        return False
    return hpacellseg.cuda_available()


SEGMENTERS: dict[str, Callable[..., np.ndarray]] = {
    "classical": segment_classical,
    "hpacellseg": _segment_hpacellseg,
}
