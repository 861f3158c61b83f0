"""Which cells carry an image's labels: out-of-fold relabelling of cell tiles, as the competition's
top solutions refined their weak cell labels.

Relabelling is a step of its own, before a cell run with ``relabel=True``: `relabel(config)` trains
`CellSettings.relabel_folds` cell models, each on the tiles of all training images but one fold (a run
folder each under ``RUN/folds/``), and scores the tiles of the fold it never saw. Those out-of-fold
scores set each training tile's target (`refine`), written to ``RUN/targets.csv``; the cell run then
reads them (`hpa_nb.training.plan.prepare` never trains a model itself). Validation tiles keep their
weak labels, so their scores stay comparable with a run without relabelling.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from hpa_nb.cells.scoring import load_classifier
from hpa_nb.core.labels import N_CLASSES, NEGATIVE, parse_label
from hpa_nb.data import tiles
from hpa_nb.data.crops import resize_image
from hpa_nb.training import plan, run, split, train
from hpa_nb.training.config import TrainConfig

logger = logging.getLogger(__name__)

# The exponent on each cell's score relative to its image's best cell (`refine`). Measured on the default
# sample, scored on 400 held-out images (docs): 1 gave cell mAP 0.742 / 0.339 (challenge / all classes),
# 2 gave 0.752 / 0.361, 3 gave 0.762 / 0.368, one run each.
SHARPNESS = 3.0


def refine(
    scores: dict[str, np.ndarray], image_labels: dict[str, str], sharpness: float = SHARPNESS
) -> dict[str, np.ndarray]:
    """Targets for tiles from their out-of-fold scores (tile key → 19 floats) and their images' labels.

    For each class of its image, a tile's target is its score divided by the highest score of that
    class among the image's tiles, raised to `sharpness`: the cell the model finds most likely keeps
    the label (every label of an image is on at least one of its cells); with the default 3, a cell it
    finds half as likely gets 0.125, since a fold model trained on weak labels still gives every cell
    of a labelled image some of the label. Classes the image lacks stay 0. A cell of a labelled image is
    Negative as far as it carries none of the labels: ``1 - max`` of its targets. An all-Negative
    image's cells stay Negative.
    """
    by_image: dict[str, list[str]] = {}
    for key in scores:
        by_image.setdefault(key.rpartition("_")[0], []).append(key)
    targets = {}
    for image_id, keys in by_image.items():
        weak = parse_label(image_labels[image_id], image_id)
        if weak[NEGATIVE] > 0:
            for key in keys:
                targets[key] = weak.copy()
            continue
        block = np.stack([scores[key] for key in keys]).astype(np.float32) * weak
        best = block.max(axis=0)
        relative = np.divide(block, best, out=np.zeros_like(block), where=best > 0) ** np.float32(sharpness)
        relative[:, best <= 0] = weak[best <= 0]  # no score at all for a label: every cell keeps it
        relative[:, NEGATIVE] = 1.0 - relative.max(axis=1)
        for key, row in zip(keys, relative):
            targets[key] = np.clip(row, 0.0, 1.0)
    return targets


def folds_of(image_ids: list[str], folds: int, seed: int) -> list[list[str]]:
    """`image_ids` dealt into `folds` parts at random (deterministic per seed), in input order within each."""
    order = np.random.default_rng([seed, 7]).permutation(len(image_ids))
    fold_of = np.empty(len(image_ids), int)
    fold_of[order] = np.arange(len(image_ids)) % folds
    return [[i for i, f in zip(image_ids, fold_of) if f == k] for k in range(folds)]


def out_of_fold_scores(config: TrainConfig, run_dir: Path, train_image_ids: list[str]) -> dict[str, np.ndarray]:
    """Each training tile's score by the fold model that never saw its image (tile key → 19 floats).

    Fold `k` trains in ``run_dir/folds/k`` (a run folder like any other: a killed fold resumes, a
    finished one is reused) on the other folds' images, validated on its own, which it then scores.
    """
    manifest = tiles.read_manifest(config.cells.tiles)
    scores: dict[str, np.ndarray] = {}
    parts = folds_of(train_image_ids, config.cells.relabel_folds, config.data.seed)
    for k, held_out in enumerate(parts):
        fold_dir, split_file = run.RunFolder(run_dir).fold(k), run.RunFolder(run_dir).fold_split(k)
        held = set(held_out)
        run.write_split(split_file, [i for i in train_image_ids if i not in held], held_out)
        if not run.is_run(fold_dir):
            logger.info(
                f"relabel: fold {k + 1} of {len(parts)}: training on {len(train_image_ids) - len(held)} images, "
                f"scoring the cells of {len(held)}"
            )
            fold = config.replace(
                relabel=False,
                out_dir=str(fold_dir),
                split_from=str(split_file),
                resume=run.RunFolder(fold_dir).config.is_file(),
                resume_from=None,
            )
            train.train(fold)
        model = load_classifier(fold_dir, level="cell")
        crops, info = tiles.load_tiles(config.cells.tiles, image_ids=held_out)
        crops = crops[..., : len(model.channels)].astype(np.float32)
        if crops.shape[1] != model.image_size:
            crops = np.stack([resize_image(crop, model.image_size) for crop in crops])
        fold_scores = model(crops) if len(crops) else np.zeros((0, N_CLASSES), np.float32)
        scores.update(zip(info["key"] if len(info) else [], fold_scores))
    expected = set(tiles.tile_keys(manifest, train_image_ids))
    if set(scores) != expected:
        raise RuntimeError(f"relabel: {len(expected - set(scores))} training tiles got no out-of-fold score")
    return scores


def relabel(config: TrainConfig) -> Path:
    """The relabelling step of the cell run `config` describes: write the training targets it reads,
    ``RUN/targets.csv``, from out-of-fold scores (`refine`), and return that file's path. A file already
    there is kept (a resumed step), and so is each fold run already finished."""
    config = plan.resolve(config)
    folder = run.RunFolder(config.runtime.out_dir)
    if folder.targets.is_file():
        logger.info(f"relabel: keeping {folder.targets}")
        return folder.targets
    train_image_ids = split.image_split(Path(config.data.data_dir), folder.path, config, reuse=config.runtime.resume)[0]
    scores = out_of_fold_scores(config, folder.path, train_image_ids)
    labels = tiles.image_labels(tiles.read_manifest(config.cells.tiles))
    targets = refine(scores, labels)
    run.write_targets(folder.path, targets)
    moved = np.mean(
        [
            not np.array_equal(target > 0.5, parse_label(labels[key.rpartition("_")[0]]) > 0.5)
            for key, target in targets.items()
        ]
    )
    logger.info(
        f"relabel: {len(targets)} training cells, {moved:.0%} of them with other classes than their image's label "
        f"(at 0.5)"
    )
    return folder.targets
