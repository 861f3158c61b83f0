"""Run in a venv with torch (tests/test_hpacellseg.py): hpa_nb.segmentation.hpacellseg against the stand-in package.
Prints one JSON object of what it saw. argv[1]: a scratch folder."""

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.simplefilter("ignore")
here = Path(__file__).parent
sys.path[:0] = [str(here)]
scratch = Path(sys.argv[1])
seen = {"torch": torch.__version__, "numpy": np.__version__}

from pytorch_zoo.unet import PixelUnet  # noqa: E402

nuclei_file, cell_file = scratch / "nuclei-model.pth", scratch / "cell-model.pth"
torch.save(torch.nn.DataParallel(PixelUnet(2)), nuclei_file)  # whole pickled modules, as published
torch.save(torch.nn.DataParallel(PixelUnet(0)), cell_file)
try:
    torch.load(nuclei_file)
    seen["default_load"] = "loaded"
except Exception as error:  # noqa: BLE001
    seen["default_load"] = type(error).__name__

import hpacellseg.cellsegmentator as package  # noqa: E402
import hpacellseg.utils as package_utils  # noqa: E402

modules = [torch.load(f, weights_only=False).module for f in (nuclei_file, cell_file)]
try:
    package.CellSegmentator(*modules, device="cpu").pred_nuclei([np.zeros((64, 64), np.uint8)])
    seen["unpatched_rescale"] = "ran"
except TypeError as error:
    seen["unpatched_rescale"] = str(error)
try:
    package_utils.label_cell(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8))
    seen["unpatched_label_cell"] = "ran"
except AttributeError as error:
    seen["unpatched_label_cell"] = str(error).splitlines()[0]

from hpa_nb.segmentation import hpacellseg  # noqa: E402

seen["loaded"] = type(hpacellseg.load_model(nuclei_file)).__name__
segmenter = hpacellseg.HpaCellSegmenter(nuclei_file, cell_file, device="cpu", scale_factor=0.5)
seen["numpy_bool_after_patch"] = hasattr(np, "bool")  # the fix stays inside the package's module
try:
    from skimage import transform

    transform.rescale(np.zeros((8, 8, 3)), 0.5, multichannel=True)
    seen["skimage_rescale_after_patch"] = "accepts multichannel"
except TypeError:
    seen["skimage_rescale_after_patch"] = "unchanged"

# Two planted cells (about 2,800 px each, far under the package's 5,500) in a 256 x 320 image.
rows, cols = np.mgrid[:256, :320]
centres = [(128, 60), (100, 250)]
truth = np.zeros((256, 320), np.int32)
red, blue = np.zeros((256, 320), np.float32), np.zeros((256, 320), np.float32)
for k, (r, c) in enumerate(centres, 1):
    disc = (rows - r) ** 2 + (cols - c) ** 2
    truth[disc < 30**2] = k
    red[disc < 30**2], blue[disc < 12**2] = 200.0, 250.0
seen["package_shape_for_256x320"] = list(
    package.CellSegmentator(*modules, device="cpu", scale_factor=0.5).pred_nuclei([blue.astype(np.uint8)])[0].shape[:2]
)
labels = segmenter(red, blue, red)
seen["labels_shape"] = list(labels.shape)
ious = []
for k in (1, 2):
    found = np.bincount(labels[truth == k]).argmax()
    inter = np.sum((labels == found) & (truth == k)) if found else 0
    ious.append(float(inter / np.sum((labels == found) | (truth == k))) if found else 0.0)
seen["planted_ious"] = ious
seen["cells"] = int(len(np.unique(labels)) - 1)
token = hpacellseg._AREA_SCALE.set(1.0)  # the package's own 2048 px areas
try:
    seen["cells_at_fixed_areas"] = int(
        len(
            np.unique(
                package_utils.label_cell(
                    *[
                        np.dstack([np.zeros_like(red), np.zeros_like(red), (x > 0) * 255.0]).astype(np.uint8)
                        for x in (blue, red)
                    ]
                )[1]
            )
        )
        - 1
    )
finally:
    hpacellseg._AREA_SCALE.reset(token)
try:
    hpacellseg.load_model(scratch / "missing.pth")
except FileNotFoundError as error:
    seen["missing_file"] = str(error)
from hpa_nb.segmentation.hpacellseg import SegmentationUnavailableError  # noqa: E402

for name, folder in (("wrong_zoo", "pypi_pytorch_zoo"), ("fork_without_torchvision", "fork_without_torchvision")):
    for module in ("pytorch_zoo", "pytorch_zoo.unet"):
        sys.modules.pop(module, None)
    sys.path.insert(0, str(here / folder))  # this pytorch_zoo now comes first
    try:
        hpacellseg.load_model(cell_file)
    except SegmentationUnavailableError as error:
        seen[name] = str(error)
for module in ("pytorch_zoo", "pytorch_zoo.unet"):  # the stand-in fork again
    sys.modules.pop(module, None)
sys.path.remove(str(here / "fork_without_torchvision"))
sys.path.remove(str(here / "pypi_pytorch_zoo"))
from pytorch_zoo.unet import PixelUnet  # noqa: E402

# The wrong files, each stopped in one line.
wrong = {
    "four_planes.pth": torch.nn.DataParallel(PixelUnet(0, input_channel_num=4)),
    "plain_conv.pth": torch.nn.Conv2d(4, 3, 1),  # declares nothing: tried on a blank image
    "classifier.pth": torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1)),
}
for name, module in wrong.items():
    torch.save(module, scratch / name)
    try:
        hpacellseg.load_model(scratch / name)
    except ValueError as error:
        seen["wrong_" + name] = str(error).replace(str(scratch), "SCRATCH")
for name, pair in {
    "two_channel": (nuclei_file, scratch / "dpn_unet_cell_v2.pth"),
    "nuclei_as_cell": (nuclei_file, scratch / "dpn_unet_nuclei_v1.pth"),
    "one_file_twice": (cell_file, cell_file),
}.items():
    try:
        hpacellseg.HpaCellSegmenter(*pair, device="cpu")
    except ValueError as error:
        seen["pair_" + name] = str(error).replace(str(scratch), "SCRATCH")

# The offline folder, built from the stand-in package and fork with the weights under their Zenodo names.
from hpa_nb.segmentation import offline as hpacellseg_offline  # noqa: E402

zenodo = scratch / "zenodo"
zenodo.mkdir()
nuclei_file.rename(zenodo / "dpn_unet_nuclei_v1.pth")
cell_file.rename(zenodo / "dpn_unet_cell_3ch_v1.pth")
hpacellseg_offline.build(here, here, zenodo, scratch / "offline", "someone")
np.save(scratch / "planted.npy", np.stack([red, blue, truth]))
print(json.dumps(seen))
