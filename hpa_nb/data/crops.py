"""An image's cells as a model sees them: each cell cut out (`cell_crops`, tight) or shown alone in the
image's frame (`frame_crops`), resized with the training pipeline's own kernel (one kernel for training and
scoring: no train/test skew); and the cells' ids, areas and contact with the image's edge."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from hpa_nb.data.reading import resize
from hpa_nb.segmentation.classical import upscale_labels


def resize_image(image: np.ndarray, image_size: int) -> np.ndarray:
    """``[H, W, C]`` → ``[S, S, C]`` float32 through `hpa_nb.data.reading.resize`, the training pipeline's kernel."""
    return resize(np.asarray(image, np.float32), image_size).numpy()


def cell_crops(
    image: np.ndarray, mask: np.ndarray, image_size: int, cell_ids: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's own crop for the classifier: (cell ids, float32 ``[N, S, S, C]``).

    A crop is the cell's bounding box with every pixel outside the cell set to 0, padded with
    zeros to a centred square (so the cell keeps its aspect ratio), resized to ``image_size``.
    """
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    boxes = ndimage.find_objects(mask.astype(np.int32))
    ids = np.array(
        [
            i
            for i in (cell_ids if cell_ids is not None else range(1, len(boxes) + 1))
            if 0 < i <= len(boxes) and boxes[i - 1] is not None
        ],
        np.int64,
    )
    crops = np.zeros((len(ids), image_size, image_size, image.shape[-1]), np.float32)
    for row, cell_id in enumerate(ids):
        box = boxes[cell_id - 1]
        crop = image[box] * (mask[box] == cell_id)[..., None]
        height, width = crop.shape[:2]
        side = max(height, width)
        square = np.zeros((side, side, image.shape[-1]), np.float32)
        top, left = (side - height) // 2, (side - width) // 2
        square[top : top + height, left : left + width] = crop
        crops[row] = resize_image(square, image_size)
    return ids, crops


def frame_crops(
    image: np.ndarray,
    mask: np.ndarray,
    image_size: int,
    cell_ids: Sequence[int] | None = None,
    resized: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each cell shown alone in the whole image's frame: (cell ids, float32 ``[N, S, S, C]``).

    The image is resized to ``image_size`` once (as for the image-level prediction) and every
    pixel outside the cell is set to 0, so the cell keeps the scale and position a model trained
    on whole images saw during training. `resized` is that resized image when the caller has it already.
    """
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    ids = cell_ids_of(mask) if cell_ids is None else np.asarray(cell_ids, np.int64)
    small_image = resize_image(image, image_size) if resized is None else resized
    small_mask = upscale_labels(mask, (image_size, image_size))  # nearest sampling works both ways
    crops = small_image[None] * (small_mask[None] == ids[:, None, None])[..., None]
    return ids, crops.astype(np.float32)


CROPS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "tight": cell_crops,
    "frame": frame_crops,
}


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
