"""The competition submission: every test image's cells, each with a mask and 19 confidences.

Format (one row per ID of ``sample_submission.csv``)::

    ID,ImageWidth,ImageHeight,PredictionString
    abc,2048,2048,0 0.912345 eNoLy... 16 0.700000 eNoLy... 0 0.120000 eNqz...

``PredictionString`` holds space-separated ``label confidence mask`` triplets; a cell's mask
is repeated once per label. A mask is pycocotools' RLE of the Fortran-order uint8 mask at the
PNG's original size, zlib-compressed at the best level, then base64 (`encode_mask`).

Notebook-facing: `submit` (from a run folder), `write_submission` (from any classifier),
`evaluate_cells` (the local cell mAP on sample images with ground truth), `encode_mask` /
`decode_mask` / `parse_prediction_string`.
"""
from __future__ import annotations

import base64
import csv
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from hpa_nb.cells import CellPredictions, Classifier, ScoreRule, predict_image
from hpa_nb.segmentation import ClassicalSettings, colors_needed
from hpa_nb.segmentation_quality import SegmentationScore
from hpa_nb.files import atomic_path
from hpa_nb.labels import LABEL_NAMES

# Emit every class for every cell by default. Under the competition's AP a low-confidence
# prediction can only add recall (it ranks after every higher one, so it never lowers the
# precision envelope already reached), so dropping classes can only lose score. The cost is
# size, measured on sample masks upscaled to 2048 px: ~280 characters per encoded mask, so
# ~290 per triplet, ~140 kB for an image of 25 cells × 19 classes, ~80 MB for 559 test images.
# `confidence_floor` trims that for a confident model (the quick model scores no class of any
# cell below 0.05, so for it a floor would trim nothing).
DEFAULT_CONFIDENCE_FLOOR = 0.0


def encode_mask(mask: np.ndarray) -> str:
    """A boolean [H, W] mask in the competition's encoding: RLE (pycocotools) → zlib (best) → base64."""
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(np.asarray(mask).astype(np.uint8)))
    return base64.b64encode(zlib.compress(rle["counts"], zlib.Z_BEST_COMPRESSION)).decode("ascii")


def decode_mask(text: str, height: int, width: int) -> np.ndarray:
    """The inverse of `encode_mask`: a boolean [height, width] mask."""
    from pycocotools import mask as coco_mask

    counts = zlib.decompress(base64.b64decode(text))
    return coco_mask.decode({"size": [height, width], "counts": counts}).astype(bool)


def prediction_string(predictions: CellPredictions, confidence_floor: float = DEFAULT_CONFIDENCE_FLOOR) -> str:
    """One image's ``label confidence mask`` triplets: each cell's classes scoring ≥ the floor."""
    parts: list[str] = []
    # Comparing a Fortran-ordered mask gives Fortran-ordered cell masks: no 2048² transposing copy per
    # cell (that copy took ~35 ms a cell, 20× the encoding itself).
    instances = np.asfortranarray(predictions.mask)
    for cell_id, scores in zip(predictions.cell_ids, predictions.scores):
        encoded = encode_mask(instances == cell_id)  # once per cell, repeated per class
        for label, confidence in enumerate(scores):
            if confidence >= confidence_floor:
                parts.append(f"{label} {confidence:.6f} {encoded}")
    return " ".join(parts)


def parse_prediction_string(text: str, height: int, width: int) -> list[tuple[int, float, np.ndarray]]:
    """``[(label, confidence, boolean mask)]`` from a PredictionString (for checks and notebooks)."""
    tokens = str(text).split() if isinstance(text, str) else []
    if len(tokens) % 3:
        raise ValueError(f"a PredictionString has {len(tokens)} tokens, not a multiple of 3")
    return [(int(tokens[i]), float(tokens[i + 1]), decode_mask(tokens[i + 2], height, width))
            for i in range(0, len(tokens), 3)]


def read_submission_ids(data_dir: Path) -> list[str]:
    """The IDs of ``sample_submission.csv``, in its order."""
    import pandas as pd

    path = Path(data_dir) / "sample_submission.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    table = pd.read_csv(path, dtype=str)
    if "ID" not in table.columns:
        raise ValueError(f"{path} has no ID column")
    return table["ID"].tolist()


def write_submission(
    classifier: Classifier,
    image_size: int,
    channels: str,
    data_dir: Path,
    out_csv: Path,
    method: str = "classical",
    rule: ScoreRule = ScoreRule(),
    confidence_floor: float = DEFAULT_CONFIDENCE_FLOOR,
    settings: ClassicalSettings = ClassicalSettings(),
    ids: Sequence[str] | None = None,
    progress: bool = True,
    **method_options,
) -> Path:
    """Segment and score every test image and write the submission CSV atomically.

    ``classifier`` maps ``[N, image_size, image_size, C]`` float32 (0–255) to ``[N, 19]``
    probabilities (`hpa_nb.cells.keras_classifier`). Reads ``data_dir/test/{ID}_{color}.png``
    for every ID of ``sample_submission.csv`` (or ``ids``); an image whose channel PNGs differ in
    size is a ValueError naming the file. Width and height are the PNGs' own.
    """
    from tqdm import tqdm  # plain text bars: the same in a terminal, a notebook and a Kaggle log

    data_dir, out_csv = Path(data_dir), Path(out_csv)
    ids = read_submission_ids(data_dir) if ids is None else list(ids)
    test_dir = data_dir / "test"
    for image_id in ids:  # fail before hours of work, naming the first missing file
        for color in colors_needed(channels):
            if not (test_dir / f"{image_id}_{color}.png").is_file():
                raise FileNotFoundError(f"test image {test_dir / f'{image_id}_{color}.png'} does not exist")
    with atomic_path(out_csv) as temporary:
        with open(temporary, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["ID", "ImageWidth", "ImageHeight", "PredictionString"])
            for image_id in tqdm(ids, desc="submission", unit="image", disable=not progress):
                predictions = predict_image(classifier, test_dir, image_id, image_size, channels, method, rule,
                                            settings=settings, **method_options)
                height, width = predictions.mask.shape  # the PNGs' size: `segment` keeps it
                writer.writerow([image_id, width, height, prediction_string(predictions, confidence_floor)])
    return out_csv


def submit(
    run_dir: Path,
    data_dir: Path,
    out_csv: Path,
    method: str = "classical",
    rule: ScoreRule = ScoreRule(),
    confidence_floor: float = DEFAULT_CONFIDENCE_FLOOR,
    batch_size: int = 32,
    progress: bool = True,
    **method_options,
) -> Path:
    """Write ``out_csv`` from a training run (``RUN/model.keras`` + ``RUN/config.json``).

    The model's input size and channels come from the run's config. See `write_submission`
    for the rest, `hpa_nb.segmentation.segment` for the segmentation methods and `ScoreRule` for how
    a cell's confidences are made. Returns the written path.
    """
    classifier, image_size, channels = load_classifier(run_dir, batch_size)
    print(f"submission: model {run_dir} ({image_size} px, {channels}), segmentation {method}, {rule}",
          file=sys.stderr)
    return write_submission(classifier, image_size, channels, data_dir, out_csv, method, rule, confidence_floor,
                            progress=progress, **method_options)


def load_classifier(run_dir: Path, batch_size: int = 32) -> tuple[Classifier, int, str]:
    """(classifier, image size, channels) of a training run folder."""
    from hpa_nb.cells import keras_classifier
    from hpa_nb.model import load_model
    from hpa_nb.run import MODEL_FILE, load_config

    run_dir = Path(run_dir)
    if not (run_dir / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{run_dir / MODEL_FILE} does not exist (train a model first)")

    config = load_config(run_dir)
    return keras_classifier(load_model(run_dir), batch_size), int(config.image_size), str(config.channels)


@dataclass
class CellEvaluation:
    """The local cell-level score of a model on sample images with ground-truth cells."""

    cell_map: float
    average_precisions: list[float | None]  # per class; None where no ground-truth cell has the class
    segmentation: SegmentationScore
    predictions: dict[str, CellPredictions] = field(repr=False)

    def table(self):
        """Per-class AP as a pandas DataFrame (class, name, AP), classes absent from the truth left out."""
        import pandas as pd

        rows = [(c, LABEL_NAMES[c], ap) for c, ap in enumerate(self.average_precisions) if ap is not None]
        return pd.DataFrame(rows, columns=["class", "name", "AP"])

    def __str__(self) -> str:
        return f"cell mAP {self.cell_map:.3f} over {len(self.predictions)} images; segmentation: {self.segmentation}"


def evaluate_cells(
    run_dir: Path | None,
    data_dir: Path,
    ids: Sequence[str] | None = None,
    method: str = "classical",
    rule: ScoreRule = ScoreRule(),
    use_truth_masks: bool = False,
    batch_size: int = 32,
    classifier: Classifier | None = None,
    image_size: int | None = None,
    channels: str = "rgb",
    progress: bool = True,
) -> CellEvaluation:
    """Score a model the way the competition does, on sample images with ground-truth cells.

    ``ids`` default to the sample's test images (held out from training, with masks and per-cell
    labels in ``masks/`` and ``cells.csv``). The model comes from ``run_dir``, or pass
    ``classifier``, ``image_size`` and ``channels`` instead. ``use_truth_masks=True`` scores
    the ground-truth cells (no segmentation error), which separates the two sources of error.
    """
    from hpa_nb.cells import predict_images
    from hpa_nb.segmentation_quality import load_cell_truth, score_segmentation
    from hpa_nb.metrics import cell_average_precisions

    if classifier is None:
        if run_dir is None:
            raise ValueError("evaluate_cells needs run_dir or classifier + image_size")
        classifier, image_size, channels = load_classifier(run_dir, batch_size)
    if image_size is None:
        raise ValueError("evaluate_cells: pass image_size with classifier")
    ids = read_submission_ids(data_dir) if ids is None else list(ids)
    masks, labels = load_cell_truth(data_dir, ids)
    predictions = predict_images(classifier, data_dir, ids, image_size, channels, method, rule,
                                 use_truth_masks=use_truth_masks, progress=progress, masks=masks)
    segmentation = SegmentationScore(0, 0, 0, 0.0, 0.6)
    for image_id, predicted in predictions.items():
        segmentation = segmentation + score_segmentation(predicted.mask, masks[image_id], 0.6)
    average_precisions = cell_average_precisions({i: p.as_map_input() for i, p in predictions.items()}, masks, labels)
    present = [ap for ap in average_precisions if ap is not None]
    return CellEvaluation(float(np.mean(present)) if present else 0.0, average_precisions, segmentation, predictions)
