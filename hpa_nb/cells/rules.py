"""How a cell's scores are made from the image-level, cell and CAM probabilities (`ScoreRule`), the rules a
submission uses by default, and a rule file that `compare --out` wrote. numpy only, so the command line reads the
choices and defaults without loading a model framework."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from hpa_nb.core.labels import NEGATIVE

# What a classifier may be shown of a cell: the keys of `hpa_nb.data.crops.CROPS` (a test keeps the two equal; that
# module resizes with TensorFlow, which the command line must not load to parse its options).
CROP_KINDS = ("tight", "frame")


Terms = Sequence[tuple[np.ndarray, float]]  # (probabilities, weight) pairs, the weights summing to 1


def _combine_geometric(terms: Terms) -> np.ndarray:
    return np.prod([np.power(probs, weight) for probs, weight in terms], axis=0)


def _combine_arithmetic(terms: Terms) -> np.ndarray:
    return np.sum([weight * probs for probs, weight in terms], axis=0)


COMBINERS: dict[str, Callable[[Terms], np.ndarray]] = {
    "geometric": _combine_geometric,
    "arithmetic": _combine_arithmetic,
}


def _negative_as_predicted(scores: np.ndarray) -> np.ndarray:
    return scores


def _negative_complement(scores: np.ndarray) -> np.ndarray:
    scores = scores.copy()
    others = np.delete(scores, NEGATIVE, axis=-1).max(axis=-1)
    scores[..., NEGATIVE] = np.maximum(scores[..., NEGATIVE], 1.0 - others)
    return scores


NEGATIVE_RULES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "complement": _negative_complement,
    "model": _negative_as_predicted,
}


@dataclass(frozen=True)
class ScoreRule:
    """How a cell's 19 scores are made from the image-level and the cell-crop probabilities.

    - ``combine``: ``"arithmetic"`` (default) ``w*image + (1-w)*cell``, or ``"geometric"``
      ``image**w * cell**(1-w)`` (either source can veto a class), with ``w = image_weight``
      (default 0.7). ``image_weight=1`` gives every cell its image's probabilities and classifies
      no crops; ``0`` uses the crop alone.
    - ``crop``: what the classifier sees of a cell (`CROP_KINDS`, `hpa_nb.data.crops.CROPS`). ``"frame"`` (default): the whole
      image resized to the training size with everything but the cell blacked out
      (`frame_crops`), the scale and framing a model trained on whole images knows; ``"tight"``:
      the cell's bounding box, masked, padded to a square and resized to the training size
      (`cell_crops`), for a model trained on cell crops.
    - ``negative``: ``"complement"`` (default) sets a cell's Negative score to
      ``max(Negative, 1 - max(other classes))``: a cell where no class is likely is a Negative
      cell, even if the model (which sees Negative only on whole negative images) did not say so.
      ``"model"`` keeps the combined Negative probability as it is.
    - ``cam_weight``: the weight of the CAM cell score (`hpa_nb.cells.cam`: the image model's class maps pooled
      inside the cell), taken from the cell term's: the cell term weighs ``1 - image_weight - cam_weight``.
      Default 0, no CAM.
    - ``partial_scale``: every score of a partial cell (`partial_cells`: it touches the image's edge
      and has less than half the image's median cell area) is multiplied by this. The host advised
      "if more than half of the cell is not present, don't predict it"; the default 1.0 leaves the
      scores as they are (the docs give the measured effect of lower values).

    With a cell model (`predict_cells`' ``cell_model``), the cell term is that model's score of the
    cell's tile (`cell_crops`, as `hpa_nb.data.tiles` cut them for training), whatever ``crop`` says.

    The defaults were chosen by comparing these rules' local cell mAP for the quick model on the
    default sample (the docs give the figures). An image-trained model's crop scores are
    noisy, so the image-level probability carries most of the weight; the crop term separates
    cells of one image that carry different labels.
    """

    combine: str = "arithmetic"
    image_weight: float = 0.7
    negative: str = "complement"
    crop: str = "frame"
    partial_scale: float = 1.0
    cam_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.combine not in COMBINERS:
            raise ValueError(f"combine {self.combine!r} is not one of {sorted(COMBINERS)}")
        if self.negative not in NEGATIVE_RULES:
            raise ValueError(f"negative {self.negative!r} is not one of {sorted(NEGATIVE_RULES)}")
        if self.crop not in CROP_KINDS:
            raise ValueError(f"crop {self.crop!r} is not one of {sorted(CROP_KINDS)}")
        if not 0.0 <= self.image_weight <= 1.0:
            raise ValueError(f"image_weight {self.image_weight} is outside [0, 1]")
        if not 0.0 <= self.partial_scale <= 1.0:
            raise ValueError(f"partial_scale {self.partial_scale} is outside [0, 1]")
        if not 0.0 <= self.cam_weight <= 1.0 - self.image_weight + 1e-9:
            raise ValueError(f"cam_weight {self.cam_weight} is outside [0, 1 - image_weight]")

    @property
    def cell_weight(self) -> float:
        """The cell term's weight: what the image and CAM terms leave."""
        return max(0.0, 1.0 - self.image_weight - self.cam_weight)

    def apply(self, image_probs: np.ndarray, cell_probs: np.ndarray, cam_probs: np.ndarray | None = None) -> np.ndarray:
        """Scores ``[N, 19]`` from image probabilities ``[19]``, cell probabilities ``[N, 19]`` and, with a
        ``cam_weight``, CAM cell scores ``[N, 19]``."""
        shape = np.shape(cell_probs)
        terms = [
            (np.broadcast_to(np.asarray(image_probs, np.float64), shape), self.image_weight),
            (np.asarray(cell_probs, np.float64), self.cell_weight),
        ]
        if self.cam_weight > 0:
            if cam_probs is None:
                raise ValueError("a rule with a cam_weight needs the CAM cell scores")
            terms.append((np.asarray(cam_probs, np.float64), self.cam_weight))
        combined = COMBINERS[self.combine]([(probs, weight) for probs, weight in terms if weight > 0])
        return np.clip(NEGATIVE_RULES[self.negative](combined), 0.0, 1.0).astype(np.float32)


# The image × cell rule (`submit --cell-model`): chosen on the default sample (the docs give the comparison).
COMBINED_RULE = ScoreRule(combine="geometric", image_weight=0.3)


def load_rule(path: str | Path) -> ScoreRule:
    """A rule written by ``compare --out`` (`hpa_nb.cells.compare.ModelComparison.write_rule`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rule file {path} does not exist")
    try:
        saved = json.loads(path.read_text())
        return ScoreRule(**{f.name: saved[f.name] for f in dataclasses.fields(ScoreRule) if f.name in saved})
    except (json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"{path} is not a rule file written by compare ({exc})") from None
