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
  512 px working size keeps every real cell; on scikit-image ≥ 0.26 they go to ``max_size``.
- **The wrong files** stop with one line: a model that does not take and give 3 planes, the hosts'
  2-channel cell model (by its published name: it has the 3-channel one's architecture), a nuclei
  model given as the cell model, one file given as both.
"""

from __future__ import annotations

import contextvars
import importlib
import importlib.util
import inspect
import types
import warnings
from pathlib import Path

import numpy as np

from hpa_nb.segmentation.classical import downscale, normalise, upscale_labels

REFERENCE_SIDE = 2048  # the image side the package's pixel-area thresholds were tuned for
_AREA_SCALE: contextvars.ContextVar[float] = contextvars.ContextVar("hpacellseg_area_scale", default=1.0)


class SegmentationUnavailableError(ImportError, ValueError):
    """A segmentation method's package (or torch, or hpacellseg's pytorch_zoo fork) is missing or the wrong
    one; a ValueError too, so the CLI prints one line. Raised here, before anything is loaded."""


def _require(module: str, fix: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise SegmentationUnavailableError(f"hpacellseg needs {module} ({error}): {fix}") from None


def require_torch():
    return _require("torch", "pip install torch (on Kaggle it is preinstalled)")


def cuda_available() -> bool:
    """Whether torch is installed here and sees a CUDA GPU (False without torch)."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch  # torch: heavy and optional, only where HPA-Cell-Segmentation runs

    return bool(torch.cuda.is_available())


def _check_fork() -> None:
    """PyPI's ``pytorch-zoo`` is another package of the same import name, without ``pytorch_zoo.unet``,
    which the model files unpickle into."""
    if importlib.util.find_spec("pytorch_zoo") is None:
        raise SegmentationUnavailableError(
            "hpacellseg's model files need the pytorch_zoo fork "
            "(github.com/haoxusci/pytorch_zoo): put its source folder on sys.path"
        )
    try:
        unet = importlib.util.find_spec("pytorch_zoo.unet")  # imports the package, whose __init__ needs torchvision
    except ImportError as error:
        raise SegmentationUnavailableError(
            f"hpacellseg's pytorch_zoo fork needs {error.name} ({error}): pip install "
            f"{error.name} (on Kaggle it is preinstalled)"
        ) from None
    if unet is None:
        raise SegmentationUnavailableError(
            "the installed pytorch_zoo is PyPI's pytorch-zoo, not the fork hpacellseg needs "
            "(no pytorch_zoo.unet): pip uninstall pytorch-zoo, then put the fork's source "
            "folder (github.com/haoxusci/pytorch_zoo) on sys.path"
        )


def load_model(path: str | Path, device: str = "cpu"):
    """One published model file (a whole pickled module) as a torch module on `device`, unwrapped from
    ``DataParallel``. ``weights_only=False`` runs code from the file: only load files you trust."""
    torch = require_torch()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"hpacellseg model file {path} not found: attach the hosts' published weights "
            "(nuclei-model.pth, cell-model.pth) or pass their paths"
        )
    _check_fork()
    module = torch.load(path, map_location=torch.device(device), weights_only=False)
    if isinstance(module, torch.nn.DataParallel):
        module = module.module
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f"{path} holds a {type(module).__name__}, not a whole torch model as hpacellseg publishes")
    _check_channels(module.eval(), path, torch)
    return module


def _check_channels(module, path: Path, torch) -> None:
    """Both U-Nets take 3 planes and give 3 (background, border, inside). The fork's models declare
    theirs; any other module is tried on a small blank image."""
    declared = getattr(module, "input_channel_num", None), getattr(module, "target_channel_num", None)
    if None in declared:
        try:
            with torch.no_grad():
                declared = 3, module(torch.zeros(1, 3, 64, 64)).shape[1]
        except RuntimeError as error:
            raise ValueError(
                f"{path} does not run on a 3-channel image ({str(error).splitlines()[0]}): hpacellseg's U-Nets take 3"
            ) from None
    if tuple(declared) != (3, 3):
        raise ValueError(
            f"{path} takes {declared[0]} channels and gives {declared[1]}: hpacellseg's U-Nets "
            "take 3 and give 3 (use the hosts' dpn_unet_nuclei_v1.pth and dpn_unet_cell_3ch_v1.pth)"
        )


TWO_CHANNEL_NAMES = ("dpn_unet_cell_v2",)  # the hosts' published 2-channel cell model (no ER plane)


def two_channel_error(path: Path) -> ValueError:
    return ValueError(
        f"{path} is HPA-Cell-Segmentation's 2-channel cell model: hpa-nb feeds the ER channel and "
        "needs the 3-channel one, dpn_unet_cell_3ch_v1.pth"
    )


def check_pair(nuclei_model: Path, cell_model: Path) -> None:
    """Stop before loading when the files cannot be the nuclei model and the 3-channel cell model.

    The 2-channel cell model has the 3-channel one's architecture (the package feeds it a zero ER
    plane), so only its published name tells them apart; hpa-nb feeds the ER plane, for which the
    2-channel model was not trained."""
    nuclei_model, cell_model = Path(nuclei_model), Path(cell_model)
    name = cell_model.name.lower()
    if any(stem in name for stem in TWO_CHANNEL_NAMES) or "2ch" in name:
        raise two_channel_error(cell_model)
    if "nucle" in name:
        raise ValueError(
            f"{cell_model} is named as a nuclei model but given as the cell model: pass the 3-channel "
            "cell model (dpn_unet_cell_3ch_v1.pth)"
        )
    if nuclei_model.is_file() and cell_model.is_file() and nuclei_model.samefile(cell_model):
        raise ValueError(f"{cell_model} is given as both the nuclei and the cell model: they are two files")


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
    """`function(image, area)`, as the package calls it, with the area scaled by the current `_AREA_SCALE`.
    Where scikit-image has ``max_size`` (0.26 deprecates the positional area), the area goes there: it
    removes objects up to and including its value, the old argument those under it, hence ``area - 1``."""
    keyword = "max_size" in inspect.signature(function).parameters

    def scaled(image, area=64, *args, **kwargs):
        area = max(1, int(round(area * _AREA_SCALE.get())))
        if keyword and not args:
            return function(image, max_size=area - 1, **kwargs)
        return function(image, area, *args, **kwargs)

    return scaled


def patch_package() -> tuple[types.ModuleType, types.ModuleType]:
    """Import ``hpacellseg`` and give its two modules the fixes above (once); returns them."""
    require_torch()
    segmentator = _require(
        "hpacellseg.cellsegmentator",
        "put HPA-Cell-Segmentation's source folder on sys.path, with its requirements opencv and imageio (docs/kaggle.md)",
    )
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

    def __init__(
        self,
        nuclei_model: str | Path,
        cell_model: str | Path,
        device: str = "cpu",
        work_size: int | None = None,
        scale_factor: float = 0.25,
    ) -> None:
        segmentator, self._utils = patch_package()
        import torch  # torch: optional; Kaggle's TPU image lacks it

        device = device if device == "cpu" or torch.cuda.is_available() else "cpu"  # the package's own fallback
        self.work_size, self.device = work_size, device
        check_pair(nuclei_model, cell_model)
        self._segmentator = segmentator.CellSegmentator(
            load_model(nuclei_model, device),
            load_model(cell_model, device),
            scale_factor=scale_factor,
            device=device,
            padding=True,
            multi_channel_model=True,
        )

    def __call__(self, red: np.ndarray, blue: np.ndarray, yellow: np.ndarray) -> np.ndarray:
        """Cell labels (int32, 0 = background) of one image's channels (2-D, one shape, any scale)."""
        shape = np.shape(red)
        work = self.work_size or max(shape)
        channels = [downscale(np.asarray(c, np.float32), work) for c in (red, yellow, blue)]
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
            with warnings.catch_warnings():  # the package filters label images of one label on every image
                warnings.filterwarnings("ignore", "Only one label was provided", UserWarning)
                _, labels = self._utils.label_cell(nuclei, cells)
        finally:
            _AREA_SCALE.reset(token)
        return upscale_labels(np.asarray(labels, np.int32)[:height, :width], shape)
