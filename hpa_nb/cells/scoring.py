"""Per-cell scores: a confidence for each cell and class, from an image classifier, under a `ScoreRule`.

The competition scores cells, not images, so a submission needs (1) a mask per cell
(`hpa_nb.segmentation.backends`) and (2) a confidence per cell and class (here). Scoring resizes with
TensorFlow's training kernel. A `CellClassifier` is a model's prediction function (a float32 batch
``[N, S, S, C]`` on the 0–255 scale to ``[N, 19]`` probabilities) with the input size and channels
it was trained on; `CellClassifier.from_keras` wraps a Keras model.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from hpa_nb.cells.cam import ClassMaps, cell_scores
from hpa_nb.cells.cutting import ImageInputs, ModelInput, cut_image, cut_inputs
from hpa_nb.cells.rules import COMBINED_RULE, COMBINERS, NEGATIVE_RULES, ScoreRule  # noqa: F401 (also read from here)
from hpa_nb.core.labels import N_CLASSES
from hpa_nb.core.metrics import CellPredictions
from hpa_nb.core.workers import Workers
from hpa_nb.data.crops import partial_cells, resize_image
from hpa_nb.segmentation.backends import on_accelerator
from hpa_nb.segmentation.classical import ClassicalSettings
from hpa_nb.segmentation.images import image_folder
from hpa_nb.training.predictions import DIHEDRAL_TRANSFORMS, ensemble_weights, transform_names
from hpa_nb.training.run import RunFolder, load_config, load_model

Classifier = Callable[[np.ndarray], np.ndarray]
CamScorer = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (image, mask, cell ids) → [N, 19]


@dataclass(frozen=True)
class CellClassifier:
    """A model as the cell scorer uses it: its prediction function and the input it expects.

    ``predict`` maps a float32 batch ``[N, image_size, image_size, len(channels)]`` on the 0–255
    scale to ``[N, 19]`` probabilities; batching large inputs is its job (`from_keras`).
    """

    predict: Classifier
    image_size: int
    channels: str = "rgb"
    # The CAM cell score (`hpa_nb.cells.cam`): the image ``[H, W, C]`` (0–255, these channels), its mask and cell ids
    # to ``[N, 19]``; None for a model without the GAP → Dense head.
    cam: CamScorer | None = None
    name: str = ""  # the run it came from, in words

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.predict(batch), np.float32)

    def cam_scores(self, image: np.ndarray, mask: np.ndarray, cell_ids: np.ndarray) -> np.ndarray:
        if self.cam is None:
            raise ValueError(f"{self.name or 'this model'} has no class activation maps (no GAP → Dense head)")
        return self.cam(image, mask, cell_ids)

    def with_tta(self, transforms: Sequence[str] | None = None) -> "CellClassifier":
        """This classifier with test-time augmentation: every batch (whole image, crops, tiles) predicted under
        the flips and rotations `transforms` (default all 8 of `DIHEDRAL_TRANSFORMS`), averaged. The CAM stays."""
        names = transform_names(True, transforms)

        def predict(batch: np.ndarray) -> np.ndarray:  # every transform in one call: the classifier batches it
            batch = np.asarray(batch)
            stacked = np.concatenate([DIHEDRAL_TRANSFORMS[name](batch) for name in names])
            return np.asarray(self.predict(stacked), np.float32).reshape(len(names), len(batch), -1).mean(axis=0)

        return dataclasses.replace(self, predict=predict, name=f"{self.name} with TTA ×{len(names)}")

    @classmethod
    def average(cls, members: Sequence["CellClassifier"], weights: Sequence[float] | None = None) -> "CellClassifier":
        """An ensemble: the weighted average (default equal) of `members`' probabilities, and of their CAM scores.

        It takes the largest member's input size, each member seeing the batch resized to its own; its channels are
        the widest member's (``rgb`` is the first three of ``rgby``), each member reading its own."""
        members = list(members)
        if len(members) == 1 and weights is None:
            return members[0]
        weights = ensemble_weights(members, weights)
        size = max(member.image_size for member in members)
        channels = max((member.channels for member in members), key=len)

        def member_input(member: CellClassifier, batch: np.ndarray) -> np.ndarray:
            batch = np.asarray(batch, np.float32)[..., : len(member.channels)]
            if batch.shape[1] == member.image_size:
                return batch
            return np.stack([resize_image(image, member.image_size) for image in batch])

        def predict(batch: np.ndarray) -> np.ndarray:
            return sum(w * member(member_input(member, batch)) for member, w in zip(members, weights))

        def cam(image: np.ndarray, mask: np.ndarray, cell_ids: np.ndarray) -> np.ndarray:
            return sum(
                w * member.cam_scores(image[..., : len(member.channels)], mask, cell_ids)
                for member, w in zip(members, weights)
            )

        with_cam = all(member.cam is not None for member in members)
        name = "ensemble of " + ", ".join(f"{member.name} × {w:.2f}" for member, w in zip(members, weights))
        return cls(predict, size, channels, cam if with_cam else None, name)

    @classmethod
    def from_keras(
        cls, model, image_size: int, channels: str, batch_size: int = 32, name: str = ""
    ) -> "CellClassifier":
        """Wrap a Keras model with sigmoid outputs, run compiled in chunks of ``batch_size``.

        A chunk is padded with zeros to a power of two (at most `batch_size` rows), so the compiled predict step
        sees a few shapes only and is traced once for each: calling the model eagerly cell by cell costs tens of
        milliseconds of Python per call."""

        def predict(batch: np.ndarray) -> np.ndarray:
            outputs = []
            for start in range(0, len(batch), batch_size):
                chunk = np.asarray(batch[start : start + batch_size], np.float32)
                rows = min(batch_size, 1 << (len(chunk) - 1).bit_length())
                padded = np.concatenate([chunk, np.zeros((rows - len(chunk), *chunk.shape[1:]), np.float32)])
                outputs.append(np.asarray(model.predict_on_batch(padded))[: len(chunk)])
            return np.concatenate(outputs) if outputs else np.zeros((0, N_CLASSES), np.float32)

        try:
            maps = ClassMaps.of(model)
        except ValueError:
            maps = None

        def cam(image: np.ndarray, mask: np.ndarray, cell_ids: np.ndarray) -> np.ndarray:
            return cell_scores(maps(resize_image(image, image_size)[None])[0], mask, cell_ids)

        return cls(predict, int(image_size), str(channels), cam if maps is not None else None, name or model.name)


def load_classifier(run_dir: Path, batch_size: int = 32, level: str = "image") -> CellClassifier:
    """The model of a training run folder, with the input size and channels of its config; a run of
    another `level` (``"image"`` or ``"cell"``, `CellSettings.level`) than asked is refused."""
    run_dir = Path(run_dir)
    if not RunFolder(run_dir).model.is_file():
        raise FileNotFoundError(f"{RunFolder(run_dir).model} does not exist (train a model first)")
    config = load_config(run_dir)
    if config.cells.level != level:
        raise ValueError(
            f"{run_dir} holds a {config.cells.level}-level model, not the {level}-level model asked for "
            f"(--model takes an image run, --cell-model a cell run)"
        )
    return CellClassifier.from_keras(
        load_model(run_dir), config.data.image_size, config.data.channels, batch_size, name=str(run_dir)
    )


def load_ensemble(
    run_dirs: Sequence[Path],
    weights: Sequence[float] | None = None,
    level: str = "image",
    tta: bool = False,
    batch_size: int = 32,
) -> CellClassifier:
    """The runs' models as one classifier (`CellClassifier.average`, weights default equal), with test-time
    augmentation if asked (`CellClassifier.with_tta`)."""
    if not run_dirs:
        raise ValueError(f"no {level} run given")
    ensemble = CellClassifier.average([load_classifier(folder, batch_size, level) for folder in run_dirs], weights)
    return ensemble.with_tta() if tta else ensemble


def predict_cells(
    classifier: CellClassifier,
    image: np.ndarray,
    mask: np.ndarray,
    rule: ScoreRule = ScoreRule(),
    cell_model: CellClassifier | None = None,
    cell_image: np.ndarray | None = None,
) -> CellPredictions:
    """Score every cell of one image under `rule`.

    ``image`` is ``[H, W, C]`` float32 on the 0–255 scale in the classifier's channel order, at the
    original size; ``mask`` is its instance mask (from `segment`). The classifier sees the whole
    image resized to its input size, then all cells' crops (``CROPS[rule.crop]``) in one call:
    batching is the classifier's job. With a `cell_model` (trained on `hpa_nb.data.tiles`), the cell
    term is its score of each cell's tile, cut from ``cell_image`` (the image in the cell model's
    channel order; default ``image``). With a ``rule.cam_weight``, the classifier's CAM cell scores are computed too
    and kept (`CellPredictions.cam_probs`). Returns the cells' ids and scores ``[N, 19]``.
    """
    inputs = cut_inputs(image, mask, rule, _input_of(classifier), _input_of(cell_model), cell_image)
    return score_inputs(classifier, inputs, rule, cell_model)


def score_inputs(
    classifier: CellClassifier,
    inputs: ImageInputs,
    rule: ScoreRule = ScoreRule(),
    cell_model: CellClassifier | None = None,
) -> CellPredictions:
    """The models' part of `predict_cells`: score an image already cut (`hpa_nb.cells.cutting.cut_inputs`)."""
    mask, ids = inputs.mask, inputs.cell_ids
    image_probs = classifier(inputs.whole[None])[0] if inputs.whole is not None else np.ones(N_CLASSES, np.float32)
    if len(ids) == 0:
        return CellPredictions(mask, ids, np.zeros((0, N_CLASSES), np.float32), image_probs, encoded=inputs.encoded)
    cam_probs = classifier.cam_scores(inputs.image, mask, ids) if rule.cam_weight > 0 else None
    if inputs.crops is not None:
        crop_probs = (cell_model if cell_model is not None else classifier)(inputs.crops)
    else:
        crop_probs = np.ones((len(ids), N_CLASSES), np.float32)
    return rescore(
        CellPredictions(
            mask, ids, np.zeros((len(ids), N_CLASSES), np.float32), image_probs, crop_probs, cam_probs, inputs.encoded
        ),
        rule,
    )


def _input_of(model: CellClassifier | None) -> ModelInput | None:
    return None if model is None else ModelInput(model.image_size, model.channels)


def rescore(predictions: CellPredictions, rule: ScoreRule) -> CellPredictions:
    """The same cells scored under another `rule`, from the probabilities `predict_cells` kept: no image is read
    and no model called again. `rule` must need no other probabilities than those (the same crops or cell model,
    and the image and CAM terms whenever their weights are above 0)."""
    if predictions.cell_probs is None:
        raise ValueError("these predictions kept no cell probabilities to rescore")
    scores = rule.apply(predictions.image_probs, predictions.cell_probs, predictions.cam_probs)
    if rule.partial_scale < 1:
        scores[partial_cells(predictions.mask, predictions.cell_ids)] *= np.float32(rule.partial_scale)
    return dataclasses.replace(predictions, scores=scores)


def predict_image(
    classifier: CellClassifier,
    folder: Path,
    image_id: str,
    method: str = "classical",
    rule: ScoreRule = ScoreRule(),
    mask: np.ndarray | None = None,
    settings: ClassicalSettings = ClassicalSettings(),
    cell_model: CellClassifier | None = None,
    **method_options,
) -> CellPredictions:
    """Read ``folder/{ID}_*.png``, segment it (unless ``mask`` is given) and score its cells."""
    inputs = cut_image(
        method,
        rule,
        settings,
        _input_of(classifier),
        _input_of(cell_model),
        method_options,
        False,
        (image_id, folder, mask),
    )
    return score_inputs(classifier, inputs, rule, cell_model)


def iter_predictions(
    classifier: CellClassifier,
    data_dir: Path,
    ids: Sequence[str],
    method: str = "classical",
    rule: ScoreRule = ScoreRule(),
    masks: Mapping[str, np.ndarray] | None = None,
    progress: bool = True,
    folder: Path | None = None,
    settings: ClassicalSettings = ClassicalSettings(),
    cell_model: CellClassifier | None = None,
    workers: int | None = None,
    encode_masks: bool = False,
    **method_options,
) -> Iterator[tuple[str, CellPredictions]]:
    """``(ID, CellPredictions)`` for each image of ``data_dir/train`` or ``data_dir/test`` (or of
    ``folder``, where given), in order.

    Each image is segmented once by ``method``, unless ``masks`` (``{ID: mask}``, e.g. the true
    cells of `load_cell_truth`) holds its mask. `workers` processes (default: every core this process may use)
    read, segment and cut the images (`hpa_nb.cells.cutting`), at most two each ahead of the one scored; the
    models score each image in this process, in order, so the results are those of one worker. HPA-Cell-Segmentation
    on a GPU segments in this process, its one place on the accelerator. With `encode_masks` (a submission), the
    workers encode each cell's mask too (`CellPredictions.encoded`).
    """
    if on_accelerator(method, method_options):
        workers = 1
    work = functools.partial(
        cut_image, method, rule, settings, _input_of(classifier), _input_of(cell_model), method_options, encode_masks
    )
    items = [
        (
            image_id,
            folder if folder is not None else image_folder(data_dir, image_id),
            masks[image_id] if masks is not None else None,
        )
        for image_id in ids
    ]
    with Workers(workers, preload=["hpa_nb.cells.cutting"]) as pool:
        cut = pool.map(work, items, describe=lambda item: f"image {item[0]}")
        for image_id, inputs in zip(tqdm(ids, desc="cells", unit="image", disable=not progress), cut):
            yield image_id, score_inputs(classifier, inputs, rule, cell_model)


def predict_images(
    classifier: CellClassifier,
    data_dir: Path,
    ids: Sequence[str],
    method: str = "classical",
    rule: ScoreRule = ScoreRule(),
    masks: Mapping[str, np.ndarray] | None = None,
    progress: bool = True,
    **options,
) -> dict[str, CellPredictions]:
    """`iter_predictions` kept as ``{ID: CellPredictions}`` in ``ids`` order, for a notebook to reuse.

    Every mask is kept at its image's size (2 bytes a pixel: 8 MiB for a 2048 px image). Feed
    ``{ID: p.as_map_input()}`` to `hpa_nb.core.metrics.cell_map`.
    """
    return dict(iter_predictions(classifier, data_dir, ids, method, rule, masks, progress, **options))
