"""Every cell scoring side by side on images with true cells: the image model, the cell model, the CAM cell score,
their combinations, ensembles of several runs, each with and without cell TTA, in both readings of the metric.

The weights of the tuned rows (image, CAM and cell terms, and the scale of cells cut off by the edge) are
cross-tuned (`cross_tune`): the images are dealt into `TUNING_PARTS` parts, and each part is scored under the weights
tuned on the other parts, so no image is scored with weights tuned on it; the rule a submission takes is the one tuned
on all of them. Each image is segmented once, every model predicts once per variant, and the rows rescore those
probabilities (`hpa_nb.cells.scoring.rescore`) against cells matched to the truth once (`CellMatches`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from hpa_nb.cells.scoring import COMBINED_RULE, CellClassifier, ScoreRule, predict_images, rescore
from hpa_nb.cells.submit import read_submission_ids
from hpa_nb.core.files import write_text
from hpa_nb.core.metrics import READINGS, CellMatches, CellPredictions, match_cells
from hpa_nb.segmentation.quality import load_cell_truth

# A rule that needs all three terms, so one prediction pass keeps the image, cell and CAM probabilities to rescore.
PROBE = ScoreRule("geometric", image_weight=0.3, cam_weight=0.2)
IMAGE_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)  # the grid the tuned rows search (geometric, Negative complement)
CAM_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7)
PARTIAL_SCALES = (1.0, 0.5, 0.0)
# Cross-tuning: on 200 images the best weights swung from cell alone to CAM 0.7 between two halves of the 400
# evaluation images; tuned on 300 of them, 4 times over, they settled (docs).
TUNING_PARTS = 4


def parts(ids: Sequence[str], count: int = TUNING_PARTS) -> list[list[str]]:
    """`ids` dealt into `count` parts in turn, in order."""
    ids = list(ids)
    return [ids[k::count] for k in range(count)]


def matches_of(predictions: Mapping[str, CellPredictions], truth: tuple[dict, dict]) -> CellMatches:
    """The predicted cells of `predictions` matched once against the true ones."""
    masks, labels = truth
    cells = {image_id: [p.mask == cell for cell in p.cell_ids] for image_id, p in predictions.items()}
    return match_cells(cells, {i: masks[i] for i in predictions}, {i: labels.get(i, {}) for i in predictions})


def scores_under(predictions: Mapping[str, CellPredictions], rule: ScoreRule) -> list[np.ndarray]:
    """Every cell's scores under `rule`, in the order `matches_of` lists the cells."""
    return [row for p in predictions.values() for row in rescore(p, rule).scores]


def tune(predictions: Mapping[str, CellPredictions], matches: CellMatches, reading: str = "challenge") -> ScoreRule:
    """The geometric rule with the best cell mAP on these cells: image and CAM weights over the grid, then the
    scale of cells cut off by the edge."""

    def score(rule: ScoreRule) -> float:
        return matches.mean_average_precision(scores_under(predictions, rule), reading=reading)

    grid = [
        ScoreRule("geometric", wi, cam_weight=wc)
        for wi, wc in itertools.product(IMAGE_WEIGHTS, CAM_WEIGHTS)
        if wi + wc <= 1.0
    ]
    best = max(grid, key=score)  # max keeps the first of equals: the lower weights
    return max((dataclasses.replace(best, partial_scale=s) for s in PARTIAL_SCALES), key=score)


def cross_tune(
    predictions: Mapping[str, CellPredictions], truth: tuple[dict, dict], count: int = TUNING_PARTS
) -> tuple[dict[str, CellPredictions], ScoreRule]:
    """Every image scored under the rule `tune` found on the other parts (`parts`), and the rule tuned on all."""
    rescored = {}
    for part in parts(list(predictions), count):
        others = {i: p for i, p in predictions.items() if i not in set(part)}
        rule = tune(others, matches_of(others, truth))
        rescored.update({i: rescore(predictions[i], rule) for i in part})
    return {i: rescored[i] for i in predictions}, tune(predictions, matches_of(predictions, truth))


def describe_rule(rule: ScoreRule) -> str:
    return (
        f"{rule.combine}: image {rule.image_weight:g}, cell {rule.cell_weight:g}, CAM {rule.cam_weight:g}, "
        f"edge cells × {rule.partial_scale:g}"
    )


@dataclass
class Scoring:
    """One row: a rule over one variant's probabilities, and its cell mAP on the reported images."""

    name: str
    tta: bool
    rule: ScoreRule  # for a cross-tuned row, the rule tuned on all the images (each part was scored under its own)
    maps: dict[str, float]  # reading → cell mAP
    predictions: dict[str, CellPredictions] = field(repr=False)
    tuned: bool = False


@dataclass
class ModelComparison:
    """Every scoring's cell mAP on the same cells of the same images, and the rules the tuned rows chose."""

    scorings: list[Scoring]
    images: list[str]

    def __getitem__(self, key: str | tuple[str, bool]) -> Scoring:
        name, tta = key if isinstance(key, tuple) else (key, False)
        for scoring in self.scorings:
            if (scoring.name, scoring.tta) == (name, tta):
                return scoring
        raise KeyError(f"no scoring {name!r}{' with TTA' if tta else ''}")

    def table(self) -> pd.DataFrame:
        """One row per scoring: its name, TTA, cell mAP in both readings, and its rule."""
        return pd.DataFrame(
            [
                (
                    s.name,
                    "yes" if s.tta else "no",
                    s.maps["challenge"],
                    s.maps["all_classes"],
                    ("cross-tuned; on all: " if s.tuned else "") + describe_rule(s.rule),
                )
                for s in self.scorings
            ],
            columns=["scoring", "TTA", "cell mAP (challenge)", "cell mAP (all classes)", "rule"],
        )

    def best(self) -> Scoring:
        return max(self.scorings, key=lambda s: s.maps["challenge"])

    def write_rule(self, path: str | Path, name: str | None = None, tta: bool | None = None) -> Path:
        """The rule of the best row (or of `name`) as JSON, for ``submit --rule``."""
        chosen = self.best() if name is None else self[(name, bool(tta))]
        return write_text(
            Path(path),
            json.dumps({"scoring": chosen.name, "tta": chosen.tta, **dataclasses.asdict(chosen.rule)}, indent=1) + "\n",
        )

    def __str__(self) -> str:
        return self.table().round(3).to_string(index=False)


def compare_models(
    image_models: CellClassifier | Sequence[CellClassifier],
    cell_models: CellClassifier | Sequence[CellClassifier],
    data_dir: Path,
    ids: Sequence[str] | None = None,
    method: str = "classical",
    use_truth_masks: bool = False,
    progress: bool = True,
    tta: bool = True,
    border_scale: float | None = 0.0,
    workers: int | None = None,
    **method_options,
) -> ModelComparison:
    """Score the images of `data_dir` with true cells (the sample's test images by default) every way.

    Rows: "image model" (the image run's own rule, image and frame crop), "cell model", "CAM", "image × cell"
    (`COMBINED_RULE`), with `border_scale` "image × cell, edge cells × s", and "image × cell × CAM, tuned" (weights
    cross-tuned, `cross_tune`); with more than one image or cell run, "ensemble …" rows of all of them averaged. With
    `tta`, the same rows again (but the image model's and the CAM's) with each image and tile under the 8 flips and
    rotations, averaged. The first image and cell run make the single rows."""
    image_models = [image_models] if isinstance(image_models, CellClassifier) else list(image_models)
    cell_models = [cell_models] if isinstance(cell_models, CellClassifier) else list(cell_models)
    ids = read_submission_ids(data_dir) if ids is None else list(ids)
    truth = load_cell_truth(data_dir, ids)
    image_only = predict_images(
        image_models[0],
        data_dir,
        ids,
        method,
        ScoreRule(),
        masks=truth[0] if use_truth_masks else None,
        progress=progress,
        workers=workers,
        **method_options,
    )
    masks = {image_id: cells.mask for image_id, cells in image_only.items()}
    matches = matches_of(image_only, truth)
    scorings = [_scoring("image model", False, ScoreRule(), image_only, matches)]
    variants = [("", image_models[0], cell_models[0])]
    if len(image_models) > 1 or len(cell_models) > 1:
        variants.append(
            (
                f"ensemble of {len(image_models)} image and {len(cell_models)} cell runs",
                CellClassifier.average(image_models),
                CellClassifier.average(cell_models),
            )
        )
    for (prefix, image_model, cell_model), with_tta in itertools.product(variants, (False, True) if tta else (False,)):
        if with_tta:
            image_model, cell_model = image_model.with_tta(), cell_model.with_tta()
        probed = predict_images(
            image_model,
            data_dir,
            ids,
            method,
            PROBE,
            masks=masks,
            progress=progress,
            cell_model=cell_model,
            workers=workers,
        )
        rules = (
            {
                "cell model": dataclasses.replace(PROBE, image_weight=0.0, cam_weight=0.0),
                "CAM": dataclasses.replace(PROBE, image_weight=0.0, cam_weight=1.0),
                "image × cell": COMBINED_RULE,
            }
            if not prefix
            else {f"{prefix}, image × cell": COMBINED_RULE}
        )
        if not prefix and border_scale is not None and border_scale != COMBINED_RULE.partial_scale:
            rules[f"image × cell, edge cells × {border_scale:g}"] = dataclasses.replace(
                COMBINED_RULE, partial_scale=border_scale
            )
        for name, rule in rules.items():
            if not (with_tta and name == "CAM"):  # the class maps are taken without TTA
                scorings.append(_scoring(name, with_tta, rule, probed, matches))
        rescored, tuned = cross_tune(probed, truth)
        scorings.append(
            Scoring(
                f"{prefix or 'image × cell × CAM'}, tuned",
                with_tta,
                tuned,
                _maps(matches, rescored),
                rescored,
                tuned=True,
            )
        )
    return ModelComparison(sorted(scorings, key=lambda s: s.tta), ids)  # without TTA first


def _maps(matches: CellMatches, scored: Mapping[str, CellPredictions]) -> dict[str, float]:
    rows = [row for p in scored.values() for row in p.scores]
    return {reading: matches.mean_average_precision(rows, reading=reading) for reading in READINGS}


def _scoring(
    name: str, tta: bool, rule: ScoreRule, predictions: dict[str, CellPredictions], matches: CellMatches
) -> Scoring:
    rescored = {i: rescore(p, rule) for i, p in predictions.items()}
    return Scoring(name, tta, rule, _maps(matches, rescored), rescored)
