"""Cell masks in the competition's encoding: COCO RLE, zlib at its best level, base64. Encoding every cell of a
2048 px image takes a full-image comparison and an RLE per cell, so a submission does it in the workers that cut
the images (`hpa_nb.cells.cutting`)."""

from __future__ import annotations

import base64
import zlib

import numpy as np
from scipy import ndimage


def encode_mask(mask: np.ndarray) -> str:
    """A boolean [H, W] mask in the competition's encoding: RLE (pycocotools) → zlib (best) → base64."""
    from pycocotools import mask as coco_mask  # pycocotools: not on Kaggle's TPU image

    rle = coco_mask.encode(np.asfortranarray(np.asarray(mask).astype(np.uint8)))
    return base64.b64encode(zlib.compress(rle["counts"], zlib.Z_BEST_COMPRESSION)).decode("ascii")


def decode_mask(text: str, height: int, width: int) -> np.ndarray:
    """The inverse of `encode_mask`: a boolean [height, width] mask."""
    from pycocotools import mask as coco_mask  # pycocotools: not on Kaggle's TPU image

    counts = zlib.decompress(base64.b64decode(text))
    return coco_mask.decode({"size": [height, width], "counts": counts}).astype(bool)


def encode_cells(mask: np.ndarray, cell_ids: np.ndarray) -> tuple[str, ...]:
    """Each cell's mask of an instance mask, encoded as `encode_mask` encodes it, in `cell_ids` order.

    COCO RLE runs down the columns, so a cell's runs lie in the columns its box spans, and the rest is zeros. Each
    cell's runs are counted there alone (not over a whole-image comparison per cell) and compressed by pycocotools
    from those counts: the same counts, so the same bytes as `encode_mask(mask == cell_id)`."""
    from pycocotools import mask as coco_mask  # pycocotools: not on Kaggle's TPU image

    height, width = mask.shape
    boxes = ndimage.find_objects(np.asarray(mask, np.int32))
    encoded = []
    for cell_id in cell_ids:
        box = boxes[cell_id - 1] if 0 < cell_id <= len(boxes) else None
        if box is None:  # no pixel: one run of zeros
            counts = [height * width]
        else:
            columns = box[1]
            inside = (mask[:, columns] == cell_id).ravel(order="F")
            starts = np.concatenate([[0], np.flatnonzero(inside[1:] != inside[:-1]) + 1])
            counts = np.diff(np.concatenate([starts, [inside.size]])).tolist()
            if inside[0]:
                counts.insert(0, 0)  # COCO counts open with the zeros before the first one
            counts[0] += columns.start * height
            after = (width - columns.stop) * height
            if len(counts) % 2:  # the last run is of zeros
                counts[-1] += after
            elif after:
                counts.append(after)
        rle = coco_mask.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        encoded.append(base64.b64encode(zlib.compress(rle["counts"], zlib.Z_BEST_COMPRESSION)).decode("ascii"))
    return tuple(encoded)
