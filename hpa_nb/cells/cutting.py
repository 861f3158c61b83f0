"""What the models see of one image, cut without a model: read, segment, resize the whole image, and cut each
cell's crop or tile. This is the per-image work that `hpa_nb.cells.scoring.iter_predictions` runs in worker
processes (`hpa_nb.core.workers`), while the models score the results, batched, in the main process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpa_nb.cells.masks import encode_cells
from hpa_nb.cells.rules import ScoreRule
from hpa_nb.data.crops import CROPS, cell_crops, cell_ids_of, frame_crops, resize_image
from hpa_nb.segmentation.backends import segment
from hpa_nb.segmentation.classical import ClassicalSettings
from hpa_nb.segmentation.images import colors_needed, read_channels, stack_channels


@dataclass(frozen=True)
class ModelInput:
    """The input a model takes: its side in px and its channels ("rgb", "rgby")."""

    image_size: int
    channels: str


@dataclass
class ImageInputs:
    """One image cut for scoring under a rule: ``crops[i]`` belongs to cell ``cell_ids[i]`` of ``mask``."""

    mask: np.ndarray  # uint16 [H, W] at the original size
    cell_ids: np.ndarray  # int64 [N]
    whole: np.ndarray | None  # float32 [S, S, C]: the image at the classifier's size, for the image term
    crops: np.ndarray | None  # float32 [N, S', S', C']: the classifier's crops, or the cell model's tiles
    image: np.ndarray | None  # float32 [H, W, C]: the image itself, kept only for the CAM term
    encoded: tuple[str, ...] | None = None  # each cell's mask in the competition's encoding, for a submission


def cut_inputs(
    image: np.ndarray,
    mask: np.ndarray,
    rule: ScoreRule,
    classifier: ModelInput,
    cell_model: ModelInput | None = None,
    cell_image: np.ndarray | None = None,
) -> ImageInputs:
    """What `rule` needs of one image (``[H, W, C]`` float32, 0–255, the classifier's channels) and its mask."""
    ids = cell_ids_of(mask)
    whole = resize_image(image, classifier.image_size) if rule.image_weight > 0 else None
    crops = None
    if len(ids) and rule.cell_weight > 0 and cell_model is not None:
        _, crops = cell_crops(image if cell_image is None else cell_image, mask, cell_model.image_size, ids)
    elif len(ids) and rule.cell_weight > 0 and rule.crop == "frame":  # the image term's resize, not a second one
        _, crops = frame_crops(image, mask, classifier.image_size, ids, resized=whole)
    elif len(ids) and rule.cell_weight > 0:
        # All crops at once: the image and mask are resized (or boxed) once, not once per batch.
        _, crops = CROPS[rule.crop](image, mask, classifier.image_size, ids)
    kept = image if len(ids) and rule.cam_weight > 0 else None
    return ImageInputs(mask, ids, whole, crops, kept)


def cut_image(
    method: str,
    rule: ScoreRule,
    settings: ClassicalSettings,
    classifier: ModelInput,
    cell_model: ModelInput | None,
    method_options: dict,
    encode_masks: bool,
    item: tuple[str, Path, np.ndarray | None],
) -> ImageInputs:
    """Read ``FOLDER/{ID}_*.png``, segment it (unless the item holds its mask) and cut it: `cut_inputs`; with
    `encode_masks`, each cell's mask encoded for the submission too."""
    image_id, folder, mask = item
    channels = [classifier.channels] + ([cell_model.channels] if cell_model is not None else [])
    pixels = read_channels(folder, image_id, colors_needed(*channels))
    if mask is None:
        mask = segment(pixels["red"], pixels["blue"], pixels["yellow"], method, settings, **method_options)
    cell_image = stack_channels(pixels, cell_model.channels) if cell_model is not None else None
    inputs = cut_inputs(stack_channels(pixels, classifier.channels), mask, rule, classifier, cell_model, cell_image)
    if encode_masks:
        inputs.encoded = encode_cells(inputs.mask, inputs.cell_ids)
    return inputs
