"""HPA-Cell-Segmentation (the hosts' ``hpacellseg`` package, 0.1.8) with today's torch, numpy and scikit-image.

The competition's test masks came from this tool, so a submission wants its cells. The package was
written for torch ≤ 1.9 and breaks on current libraries; this module works around each break without
copying its code, touching only the package's own module namespaces:

- **torch ≥ 2.6** loads weights only by default, and the published model files are whole pickled
  modules (a ``DataParallel`` around a DPN U-Net). `load_model` loads them with ``weights_only=False``
  and hands `CellSegmentator` the modules. Unpickling runs code from the file, so this is safe only
  for files you trust: the hosts' published ones.
- **scikit-image ≥ 0.20** dropped ``rescale(multichannel=)``: the package's ``cellsegmentator`` module
  sees a ``transform`` whose ``rescale`` maps it to ``channel_axis=-1``.
- **numpy 1.24–1.26** have no ``np.bool``: the package's ``utils`` module sees a numpy with it.
- **Orientation**: the package resizes its predictions back with ``cv2.resize(p, (rows, cols))``, and
  cv2 takes (width, height), so a non-square image came back stretched to the transposed shape.
  `HpaCellSegmenter` pads every image to a square first and crops the labels after.
- **Small cells**: ``label_cell`` drops nuclei under 2500 px and cells under 5500 px (and fills holes
  under 1000 px), areas tuned for 2048 px images. Here they scale with ``(side / 2048) ** 2``, so a
  512 px working size keeps every real cell.
"""
from __future__ import annotations

import contextvars
import importlib
import importlib.util
import types
from pathlib import Path

import numpy as np

from hpa_nb.segmentation import SegmentationUnavailableError, _downscale, normalise, upscale_labels

REFERENCE_SIDE = 2048  # the image side the package's pixel-area thresholds were tuned for
_AREA_SCALE: contextvars.ContextVar[float] = contextvars.ContextVar("hpacellseg_area_scale", default=1.0)


def _require(module: str, fix: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise SegmentationUnavailableError(f"hpacellseg needs {module} ({error}): {fix}") from None


def _check_fork() -> None:
    """PyPI's ``pytorch-zoo`` is another package of the same import name, without ``pytorch_zoo.unet``,
    which the model files unpickle into."""
    if importlib.util.find_spec("pytorch_zoo") is None:
        raise SegmentationUnavailableError("hpacellseg's model files need the pytorch_zoo fork "
                                    "(github.com/haoxusci/pytorch_zoo): put its source folder on sys.path")
    try:
        unet = importlib.util.find_spec("pytorch_zoo.unet")  # imports the package, whose __init__ needs torchvision
    except ImportError as error:
        raise SegmentationUnavailableError(f"hpacellseg's pytorch_zoo fork needs {error.name} ({error}): pip install "
                                    f"{error.name} (on Kaggle it is preinstalled)") from None
    if unet is None:
        raise SegmentationUnavailableError("the installed pytorch_zoo is PyPI's pytorch-zoo, not the fork hpacellseg needs "
                                    "(no pytorch_zoo.unet): pip uninstall pytorch-zoo, then put the fork's source "
                                    "folder (github.com/haoxusci/pytorch_zoo) on sys.path")


def load_model(path: str | Path, device: str = "cpu"):
    """One published model file (a whole pickled module) as a torch module on `device`, unwrapped from
    ``DataParallel``. ``weights_only=False`` runs code from the file: only load files you trust."""
    torch = _require("torch", "pip install torch (on Kaggle it is preinstalled)")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"hpacellseg model file {path} not found: attach the hosts' published weights "
                                "(nuclei-model.pth, cell-model.pth) or pass their paths")
    _check_fork()
    module = torch.load(path, map_location=torch.device(device), weights_only=False)
    if isinstance(module, torch.nn.DataParallel):
        module = module.module
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f"{path} holds a {type(module).__name__}, not a whole torch model as hpacellseg publishes")
    return module.eval()


class _Proxy(types.ModuleType):
    """A module that answers with its own attributes first, then with `base`'s."""

    def __init__(self, base: types.ModuleType, **overrides) -> None:
        super().__init__(base.__name__)
        self._base = base
        self.__dict__.update(overrides)

    def __getattr__(self, name: str):
        return getattr(self._base, name)


def _rescale(rescale):
    def compatible(image, scale, *args, multichannel=None, **kwargs):
        if multichannel is not None and "channel_axis" not in kwargs:
            kwargs["channel_axis"] = -1 if multichannel else None
        return rescale(image, scale, *args, **kwargs)

    return compatible


def _scaled(function):
    """`function(image, area, ...)` with the area scaled by the current `_AREA_SCALE`."""

    def scaled(image, area=64, *args, **kwargs):
        return function(image, max(1, int(round(area * _AREA_SCALE.get()))), *args, **kwargs)

    return scaled


def patch_package() -> tuple[types.ModuleType, types.ModuleType]:
    """Import ``hpacellseg`` and give its two modules the fixes above (once); returns them."""
    _require("torch", "pip install torch (on Kaggle it is preinstalled)")
    segmentator = _require("hpacellseg.cellsegmentator", "put HPA-Cell-Segmentation's source folder on sys.path, "
                                                         "with its requirements opencv and imageio (README)")
    utils = importlib.import_module("hpacellseg.utils")
    if not getattr(utils, "_hpa_nb_patched", False):
        segmentator.transform = _Proxy(segmentator.transform, rescale=_rescale(segmentator.transform.rescale))
        utils.np = _Proxy(np, bool=bool)
        utils.remove_small_objects = _scaled(utils.remove_small_objects)
        utils.remove_small_holes = _scaled(utils.remove_small_holes)
        utils._hpa_nb_patched = True
    return segmentator, utils


class HpaCellSegmenter:
    """The package's nuclei and cell U-Nets and its ``label_cell``, on one image at a time.

    ``work_size``: the longest side the image is resized to before segmenting (None: its own size);
    ``scale_factor``: the package's own further scaling before the networks (0.25 for 2048 px images).
    """

    def __init__(self, nuclei_model: str | Path, cell_model: str | Path, device: str = "cpu",
                 work_size: int | None = None, scale_factor: float = 0.25) -> None:
        segmentator, self._utils = patch_package()
        import torch

        device = device if device == "cpu" or torch.cuda.is_available() else "cpu"  # the package's own fallback
        self.work_size, self.device = work_size, device
        self._segmentator = segmentator.CellSegmentator(
            load_model(nuclei_model, device), load_model(cell_model, device), scale_factor=scale_factor,
            device=device, padding=True, multi_channel_model=True)

    def __call__(self, red: np.ndarray, blue: np.ndarray, yellow: np.ndarray) -> np.ndarray:
        """Cell labels (int32, 0 = background) of one image's channels (2-D, one shape, any scale)."""
        shape = np.shape(red)
        work = self.work_size or max(shape)
        channels = [_downscale(np.asarray(c, np.float32), work) for c in (red, yellow, blue)]
        height, width = channels[0].shape
        side = max(height, width)
        square = []
        for channel in channels:  # a square input: the package's resize back cannot transpose it
            canvas = np.zeros((side, side), np.uint8)
            canvas[:height, :width] = (normalise(channel) * 255).astype(np.uint8)
            square.append(canvas)
        nuclei = self._segmentator.pred_nuclei([square[2]])[0]
        cells = self._segmentator.pred_cells([[square[0]], [square[1]], [square[2]]])[0]
        token = _AREA_SCALE.set((side / REFERENCE_SIDE) ** 2)
        try:
            _, labels = self._utils.label_cell(nuclei, cells)
        finally:
            _AREA_SCALE.reset(token)
        return upscale_labels(np.asarray(labels, np.int32)[:height, :width], shape)
