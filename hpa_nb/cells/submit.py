"""The competition submission: every test image's cells, each with a mask and 19 confidences.

Format (one row per ID of ``sample_submission.csv``)::

    ID,ImageWidth,ImageHeight,PredictionString
    abc,2048,2048,0 0.912345 eNoLy... 16 0.700000 eNoLy... 0 0.120000 eNqz...

``PredictionString`` holds space-separated ``label confidence mask`` triplets; a cell's mask
is repeated once per label. A mask is pycocotools' RLE of the Fortran-order uint8 mask at the
PNG's original size, zlib-compressed at the best level, then base64 (`encode_mask`).

Notebook-facing: `submit` (from a run folder), `write_submission` (from any `CellClassifier`),
`write_predictions` (from cells already scored), `evaluate_cells` / `score_cells` (the local cell
mAP on sample images with ground truth), `encode_mask` / `decode_mask` / `parse_prediction_string`.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import tensorflow as tf

from hpa_nb.cells.masks import decode_mask, encode_cells, encode_mask  # noqa: F401 (also read from here)
from hpa_nb.cells.rules import load_rule  # noqa: F401 (notebooks read it from here)
from hpa_nb.cells.scoring import (
    COMBINED_RULE,
    CellClassifier,
    ScoreRule,
    iter_predictions,
    load_ensemble,
    predict_images,
)
from hpa_nb.core.files import atomic_path
from hpa_nb.core.labels import LABEL_NAMES
from hpa_nb.core.metrics import READINGS, CellPredictions, cell_average_precisions
from hpa_nb.segmentation.classical import ClassicalSettings
from hpa_nb.segmentation.images import colors_needed
from hpa_nb.segmentation.quality import SegmentationScore, load_cell_truth, score_segmentation
from hpa_nb.training.run import folders, load_config

logger = logging.getLogger(__name__)

# Emit every class for every cell by default. Under the competition's AP a low-confidence
# prediction can only add recall (it ranks after every higher one, so it never lowers the
# precision envelope already reached), so dropping classes can only lose score. The cost is
# the file's size (the docs give it); `confidence_floor` trims that for a confident model.
DEFAULT_CONFIDENCE_FLOOR = 0.0


def prediction_string(predictions: CellPredictions, confidence_floor: float = DEFAULT_CONFIDENCE_FLOOR) -> str:
    """One image's ``label confidence mask`` triplets: each cell's classes scoring ≥ the floor."""
    parts: list[str] = []
    # Comparing a Fortran-ordered mask gives Fortran-ordered cell masks: no transposing copy of the
    # whole image per cell, which would cost far more than the encoding itself.
    encodings = (
        predictions.encoded if predictions.encoded is not None else encode_cells(predictions.mask, predictions.cell_ids)
    )
    for encoded, scores in zip(encodings, predictions.scores):  # each cell's mask once, repeated per class
        for label, confidence in enumerate(scores):
            if confidence >= confidence_floor:
                parts.append(f"{label} {confidence:.6f} {encoded}")
    return " ".join(parts)


def parse_prediction_string(text: str, height: int, width: int) -> list[tuple[int, float, np.ndarray]]:
    """``[(label, confidence, boolean mask)]`` from a PredictionString (for checks and notebooks)."""
    tokens = str(text).split() if isinstance(text, str) else []
    if len(tokens) % 3:
        raise ValueError(f"a PredictionString has {len(tokens)} tokens, not a multiple of 3")
    return [
        (int(tokens[i]), float(tokens[i + 1]), decode_mask(tokens[i + 2], height, width))
        for i in range(0, len(tokens), 3)
    ]


def read_submission_ids(data_dir: Path) -> list[str]:
    """The IDs of ``sample_submission.csv``, in its order."""
    path = Path(data_dir) / "sample_submission.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    table = pd.read_csv(path, dtype=str)
    if "ID" not in table.columns:
        raise ValueError(f"{path} has no ID column")
    return table["ID"].tolist()


def write_predictions(
    predictions: Iterable[tuple[str, CellPredictions]] | Mapping[str, CellPredictions],
    out_csv: Path,
    confidence_floor: float = DEFAULT_CONFIDENCE_FLOOR,
) -> Path:
    """Write the submission CSV atomically from ``(ID, CellPredictions)`` pairs (or a dict), in their order.

    Width and height are each mask's own, which `segment` keeps at the PNGs' size.
    """
    out_csv = Path(out_csv)
    pairs = predictions.items() if isinstance(predictions, Mapping) else predictions
    with atomic_path(out_csv) as temporary:
        with open(temporary, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["ID", "ImageWidth", "ImageHeight", "PredictionString"])
            for image_id, cells in pairs:
                height, width = cells.mask.shape
                writer.writerow([image_id, width, height, prediction_string(cells, confidence_floor)])
    return out_csv


def write_submission(
    classifier: CellClassifier,
    data_dir: Path,
    out_csv: Path,
    method: str = "classical",
    rule: ScoreRule = ScoreRule(),
    confidence_floor: float = DEFAULT_CONFIDENCE_FLOOR,
    settings: ClassicalSettings = ClassicalSettings(),
    ids: Sequence[str] | None = None,
    progress: bool = True,
    cell_model: CellClassifier | None = None,
    workers: int | None = None,
    **method_options,
) -> Path:
    """Segment and score every test image, in order, and write the submission CSV atomically.

    Reads ``data_dir/test/{ID}_{color}.png`` for every ID of ``sample_submission.csv`` (or
    ``ids``); a missing PNG is named before any work starts, and an image whose channel PNGs
    differ in size is a ValueError naming the file. With a `cell_model` (a cell run's model),
    `rule` combines the image model's image-level scores with the cell model's tile scores. `workers` processes
    segment and cut the images (`iter_predictions`); the file is the same for any number of them.
    """
    data_dir = Path(data_dir)
    ids = read_submission_ids(data_dir) if ids is None else list(ids)
    test_dir = data_dir / "test"
    channels = [classifier.channels] + ([cell_model.channels] if cell_model is not None else [])
    for image_id in ids:  # fail before hours of work, naming the first missing file
        for color in colors_needed(*channels):
            if not (test_dir / f"{image_id}_{color}.png").is_file():
                raise FileNotFoundError(f"test image {test_dir / f'{image_id}_{color}.png'} does not exist")
    scored = iter_predictions(
        classifier,
        data_dir,
        ids,
        method,
        rule,
        progress=progress,
        folder=test_dir,
        settings=settings,
        cell_model=cell_model,
        workers=workers,
        encode_masks=True,
        **method_options,
    )
    return write_predictions(scored, out_csv, confidence_floor)


Runs = Path | Sequence[Path]  # one run folder, or several: an ensemble (`hpa_nb.training.run.folders`)


def submit(
    run_dir: Runs,
    data_dir: Path,
    out_csv: Path,
    method: str = "classical",
    rule: ScoreRule = ScoreRule(),
    confidence_floor: float = DEFAULT_CONFIDENCE_FLOOR,
    batch_size: int = 32,
    progress: bool = True,
    cell_run_dir: Runs | None = None,
    weights: Sequence[float] | None = None,
    cell_weights: Sequence[float] | None = None,
    tta: bool = False,
    workers: int | None = None,
    **method_options,
) -> Path:
    """Write ``out_csv`` from one training run or several (`load_ensemble`: averaged with `weights`, default equal),
    and one cell run or several if given; see `write_submission`. With `tta`, every model's input (whole image,
    crop, tile) is averaged over the 8 flips and rotations.

    `hpa_nb.segmentation.backends.segment` describes the segmentation methods and `ScoreRule` how a cell's
    confidences are made. Returns the written path.
    """
    image_runs, cell_runs = folders(run_dir), folders(cell_run_dir)
    classifier = load_ensemble(image_runs, weights, "image", tta, batch_size)
    cell_model = load_ensemble(cell_runs, cell_weights, "cell", tta, batch_size) if cell_runs else None
    logger.info(
        f"submission: {describe_scoring(image_runs, cell_runs, rule)}; segmentation {method}"
        + ("; TTA ×8" if tta else "")
    )
    note = accelerator_note(method)
    if note:
        logger.info(note)
    return write_submission(
        classifier,
        data_dir,
        out_csv,
        method,
        rule,
        confidence_floor,
        progress=progress,
        cell_model=cell_model,
        workers=workers,
        **method_options,
    )


def accelerator_note(method: str) -> str:
    """A line for a session that holds a GPU it does not need: classical segmentation and cutting run on the CPU
    (the models' few forward passes gain little), so only HPA-Cell-Segmentation is worth a GPU; else empty."""
    if method == "hpacellseg" or not tf.config.list_physical_devices("GPU"):
        return ""
    return (
        "note: this session has a GPU, but classical segmentation runs on the CPU cores: push 05_submission "
        "with --accelerator none and keep the GPU quota (a GPU pays with --segmentation hpacellseg)"
    )


def choose_rule(
    with_cell_model: bool,
    image_weight: float = ScoreRule.image_weight,
    partial_scale: float = ScoreRule.partial_scale,
    cam_weight: float = 0.0,
) -> ScoreRule:
    """The rule a submission scores cells under: the image × cell rule (`COMBINED_RULE`) when a cell model is
    there, else the image model's blend of image and crop with `image_weight`; `partial_scale` and `cam_weight`
    (the CAM cell score's share, taken from the cell term) on either."""
    if with_cell_model:
        return dataclasses.replace(COMBINED_RULE, partial_scale=partial_scale, cam_weight=cam_weight)
    return ScoreRule(image_weight=image_weight, partial_scale=partial_scale, cam_weight=cam_weight)


def describe_scoring(run_dir: Runs, cell_run_dir: Runs | None, rule: ScoreRule) -> str:
    """One line: which models score the cells, and under which rule."""

    def described(runs: list[Path], kind: str) -> str:
        parts = []
        for folder in runs:
            config = load_config(folder)
            size = f"{config.data.image_size} px" + (" tiles" if kind == "cell" else f", {config.data.channels}")
            parts.append(f"{kind} run {folder} ({config.model.backbone}, {size})")
        return (f"an ensemble of {len(runs)} {kind} runs: " if len(runs) > 1 else "") + ", ".join(parts)

    image_runs, cell_runs = folders(run_dir), folders(cell_run_dir)
    models = described(image_runs, "image") + (" and " + described(cell_runs, "cell") if cell_runs else "")
    name = "image × cell rule" if cell_runs else "image model's rule"
    cam = f", CAM weight {rule.cam_weight:g}" if rule.cam_weight else ""
    return (
        f"scoring cells with the {models}, under the {name}: {rule.combine}, image weight {rule.image_weight:g}"
        f"{cam}, cells cut off by the edge × {rule.partial_scale:g}"
    )


@dataclass
class CellEvaluation:
    """The local cell-level score of a model on sample images with ground-truth cells, in both readings
    of the metric (`hpa_nb.core.metrics.READINGS`: ``"challenge"`` and ``"all_classes"``)."""

    cell_maps: dict[str, float]  # reading → cell mAP
    average_precisions: dict[str, list[float | None]]  # reading → per class; None where no true cell has the class
    segmentation: SegmentationScore
    predictions: dict[str, CellPredictions] = field(repr=False)

    def table(self):
        """Per-class AP in both readings as a pandas DataFrame, classes absent from the truth left out."""
        challenge, every = self.average_precisions["challenge"], self.average_precisions["all_classes"]
        rows = [
            (c, LABEL_NAMES[c], challenge[c], every[c]) for c in range(len(LABEL_NAMES)) if challenge[c] is not None
        ]
        return pd.DataFrame(rows, columns=["class", "name", "AP (challenge)", "AP (all classes)"])

    def describe(self) -> str:
        return (
            f"cell mAP {self.cell_maps['challenge']:.3f} (challenge reading), "
            f"{self.cell_maps['all_classes']:.3f} (all classes) over {len(self.predictions)} images"
        )

    def __str__(self) -> str:
        return f"{self.describe()}; segmentation: {self.segmentation}"


def score_cells(
    predictions: Mapping[str, CellPredictions], data_dir: Path, truth: tuple[dict, dict] | None = None
) -> CellEvaluation:
    """The local cell mAP (both readings) and segmentation quality of cells already scored, against the
    sample's true cells. ``truth`` is `load_cell_truth`'s ``(masks, labels)``, read from ``data_dir`` if not given.
    """
    masks, labels = truth if truth is not None else load_cell_truth(data_dir, list(predictions))
    segmentation = SegmentationScore(0, 0, 0, 0.0, 0.6)
    for image_id, predicted in predictions.items():
        segmentation = segmentation + score_segmentation(predicted.mask, masks[image_id], 0.6)
    inputs = {i: p.as_map_input() for i, p in predictions.items()}
    average_precisions = {
        reading: cell_average_precisions(inputs, masks, labels, reading=reading) for reading in READINGS
    }
    maps = {
        reading: float(np.mean([ap for ap in aps if ap is not None] or [0.0]))
        for reading, aps in average_precisions.items()
    }
    return CellEvaluation(maps, average_precisions, segmentation, dict(predictions))


def evaluate_cells(
    classifier: CellClassifier,
    data_dir: Path,
    ids: Sequence[str] | None = None,
    method: str = "classical",
    rule: ScoreRule = ScoreRule(),
    use_truth_masks: bool = False,
    progress: bool = True,
    cell_model: CellClassifier | None = None,
    workers: int | None = None,
) -> CellEvaluation:
    """Score a model the way the competition does, on sample images with ground-truth cells.

    ``ids`` default to the sample's test images (held out from training, with masks and per-cell
    labels in ``masks/`` and ``cells.csv``). ``use_truth_masks=True`` scores the true cells instead
    of segmenting, which separates segmentation error from classification error.
    """
    ids = read_submission_ids(data_dir) if ids is None else list(ids)
    masks, labels = load_cell_truth(data_dir, ids)
    predictions = predict_images(
        classifier,
        data_dir,
        ids,
        method,
        rule,
        masks=masks if use_truth_masks else None,
        progress=progress,
        cell_model=cell_model,
        workers=workers,
    )
    return score_cells(predictions, data_dir, (masks, labels))
