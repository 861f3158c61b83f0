"""Stand-in `label_cell`: nuclei and cells from the two predictions, with fixed pixel-area thresholds."""

import numpy as np
from scipy import ndimage as ndi
from skimage import segmentation
from skimage.morphology import remove_small_holes, remove_small_objects


def label_cell(nuclei_pred, cell_pred):
    nuclei = (nuclei_pred[..., 2] / 255 > 0.4).astype(np.bool)  # np.bool: gone in numpy 1.24-1.26
    nuclei = remove_small_holes(nuclei, 1000)
    nuclei_label = remove_small_objects(ndi.label(nuclei)[0], 2500)
    cells = (cell_pred[..., 2] / 255 > 0.4).astype(np.bool)
    cell_label = segmentation.watershed(-cell_pred[..., 2].astype(float), nuclei_label, mask=cells)
    cell_label = remove_small_objects(cell_label, 5500)
    return nuclei_label * (cell_label > 0), cell_label.astype(np.uint16)
