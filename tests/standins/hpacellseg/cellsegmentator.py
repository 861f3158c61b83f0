"""Stand-in `CellSegmentator`: two U-Nets' softmax outputs, back at the input's size (see the package doc)."""

import numpy as np
import torch
import torch.nn.functional as F
from skimage import transform, util


class CellSegmentator:
    def __init__(
        self,
        nuclei_model="./nuclei_model.pth",
        cell_model="./cell_model.pth",
        scale_factor=0.25,
        device="cuda",
        padding=False,
        multi_channel_model=True,
    ):
        self.device = "cpu" if device != "cpu" and not torch.cuda.is_available() else device
        if isinstance(nuclei_model, str):
            nuclei_model = torch.load(nuclei_model, map_location=torch.device(self.device))  # torch's defaults
        if isinstance(nuclei_model, torch.nn.DataParallel):
            nuclei_model = nuclei_model.module
        if isinstance(cell_model, str):
            cell_model = torch.load(cell_model, map_location=torch.device(self.device))
        self.nuclei_model, self.cell_model = nuclei_model, cell_model
        self.scale_factor, self.padding, self.multi_channel_model = scale_factor, padding, multi_channel_model

    def _predict(self, model, image):
        self.target_shape = image.shape
        small = transform.rescale(image, self.scale_factor, multichannel=True)  # gone in scikit-image 0.20
        with torch.no_grad():
            out = F.softmax(model(torch.tensor(small.transpose(2, 0, 1)[None]).float()), dim=1)[0].numpy()
        out = out.transpose(1, 2, 0)
        # back to the input's size the way the package does it: (rows, cols) given where (width, height) is meant
        out = transform.resize(out, (self.target_shape[1], self.target_shape[0]), order=1)
        return util.img_as_ubyte(out)

    def pred_nuclei(self, images):
        return [self._predict(self.nuclei_model, np.dstack([image] * 3)) for image in images]

    def pred_cells(self, images, precombined=False):
        microtubules, er, nuclei = images
        return [self._predict(self.cell_model, np.dstack(channels)) for channels in zip(microtubules, er, nuclei)]
