"""What the winning solutions did: K-fold runs and their out-of-fold predictions, ensembles, class activation maps
and the CAM cell score, cell TTA, weights tuned on other images than those scored, and extra data sources."""

from __future__ import annotations

import json
import re

import keras
import numpy as np
import pandas as pd
import pytest

from hpa_nb.cells import compare, scoring
from hpa_nb.cells.cam import ClassMaps, cell_scores, sigmoid
from hpa_nb.cells.scoring import COMBINED_RULE, CellClassifier, ScoreRule, predict_cells, rescore
from hpa_nb.core.labels import N_CLASSES
from hpa_nb.core.metrics import CellPredictions, cell_map
from hpa_nb.data import combined, splits
from hpa_nb.sample.writer import write_sample
from hpa_nb.training import folds, run
from hpa_nb.training.model import build
from hpa_nb.training.predictions import read_predictions


def _labels(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    matrix = np.zeros((count, N_CLASSES), bool)
    matrix[np.arange(count), rng.integers(0, 6, count)] = True
    matrix[rng.random((count, N_CLASSES)) < 0.04] = True
    matrix[:, 15] = False
    matrix[[3, 50, 57, count - 1], 15] = True  # a rare class with as many images as folds
    return matrix


# --- folds ----------------------------------------------------------------------------------
def test_folds_partition_the_images_stratified_and_the_same_for_a_seed():
    ids = [f"img{i:03d}" for i in range(200)]
    matrix = _labels(200, 0)
    parts = splits.folds(ids, matrix, 4, seed=5)
    assert parts == splits.folds(ids, matrix, 4, seed=5) and parts != splits.folds(ids, matrix, 4, seed=6)
    assert sorted(sum(parts, [])) == ids and sum(len(p) for p in parts) == len(ids)
    # iterative stratification balances classes first and sizes second: each fold within 20 % of n / K
    assert all(40 <= len(p) <= 60 for p in parts), [len(p) for p in parts]
    index = {image_id: i for i, image_id in enumerate(ids)}
    for part in parts:
        counts = matrix[[index[i] for i in part]].sum(axis=0)
        assert counts[15] == 1  # the rare class reaches every fold once
        for label in np.flatnonzero(matrix.sum(axis=0) >= 40):
            assert abs(counts[label] / matrix[:, label].sum() - 0.25) < 0.1
    train_ids, val_ids = splits.holdout(ids, matrix, 0.2, 5, n_folds=4, fold=2)
    assert val_ids == parts[2] and sorted(train_ids + val_ids) == ids
    with pytest.raises(ValueError, match="fold 4 is not one of 0..3"):
        splits.holdout(ids, matrix, 0.2, 5, n_folds=4, fold=4)


def test_extra_sources_are_only_trained_on_and_leave_the_held_out_images_as_they_were():
    ids = [f"comp{i}" for i in range(120)] + [f"hpa{i}" for i in range(60)]
    matrix = _labels(180, 1)
    extra = ids[120:]
    for options in ({}, {"n_folds": 3, "fold": 1}):
        train_ids, val_ids = splits.holdout(ids, matrix, 0.2, 4, train_only=extra, **options)
        alone = splits.holdout(ids[:120], matrix[:120], 0.2, 4, **options)
        assert val_ids == alone[1] and train_ids == alone[0] + extra


def test_split_draws_the_same_images_as_before_folds_existed():
    """Runs saved before K folds existed reproduce their held-out images from (seed, val_fraction): these are the
    images the split of 1f88d31 drew."""
    ids = [f"img{i:03d}" for i in range(60)]
    _, val_ids = splits.split(ids, _labels(60, 2), 0.2, seed=3)
    assert val_ids == [
        "img005",
        "img016",
        "img017",
        "img018",
        "img023",
        "img025",
        "img028",
        "img031",
        "img032",
        "img033",
        "img036",
        "img039",
        "img055",
        "img059",
    ]


# --- CAM ------------------------------------------------------------------------------------
def test_class_maps_average_back_to_the_model_and_pool_inside_each_cell():
    keras.utils.set_random_seed(0)
    model = build("tiny", 32, "rgb", weights=None, dropout=0.0)
    maps = ClassMaps.of(model)
    batch = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    logits = maps(batch)
    assert logits.shape == (3, 4, 4, N_CLASSES)
    np.testing.assert_allclose(sigmoid(logits.mean(axis=(1, 2))), model.predict_on_batch(batch), atol=1e-5)
    whole = np.ones((64, 48), np.uint16)  # 16 x 12 pixels per map position: every position weighs the same
    np.testing.assert_allclose(
        cell_scores(logits[0], whole, np.array([1]))[0], model.predict_on_batch(batch[:1])[0], atol=1e-5
    )
    planted = np.full((4, 4, N_CLASSES), -4.0, np.float32)
    planted[:, :2, 7] = 4.0  # class 7's evidence in the left half
    mask = np.zeros((40, 40), np.uint16)
    mask[5:15, 2:18], mask[25:35, 22:38], mask[0:40, 19:21] = 3, 8, 5  # left, right, straddling
    scores = cell_scores(planted, mask, np.array([3, 5, 8]))
    assert scores[0, 7] == pytest.approx(sigmoid(np.float32(4.0)), rel=1e-5)
    assert scores[2, 7] == pytest.approx(sigmoid(np.float32(-4.0)), rel=1e-5)
    assert scores[1, 7] == pytest.approx(sigmoid(np.float32(0.0)), abs=1e-5)  # half its pixels on each side
    assert (scores[:, 2] < 0.05).all()
    with pytest.raises(ValueError, match="no 'pool' → 'probabilities' head"):
        ClassMaps.of(keras.Sequential([keras.Input((8,)), keras.layers.Dense(19)]))


def test_a_rule_with_a_cam_weight_blends_three_terms():
    image, cell, cam = np.full(N_CLASSES, 0.8), np.full((2, N_CLASSES), 0.4), np.full((2, N_CLASSES), 0.1)
    arithmetic = ScoreRule("arithmetic", 0.5, "model", cam_weight=0.25).apply(image, cell, cam)
    np.testing.assert_allclose(arithmetic, 0.5 * 0.8 + 0.25 * 0.4 + 0.25 * 0.1, rtol=1e-6)
    geometric = ScoreRule("geometric", 0.2, "model", cam_weight=0.3).apply(image, cell, cam)
    np.testing.assert_allclose(geometric, 0.8**0.2 * 0.4**0.5 * 0.1**0.3, rtol=1e-5)
    only_cam = ScoreRule("geometric", 0.0, "model", cam_weight=1.0).apply(image, cell, cam)
    np.testing.assert_allclose(only_cam, 0.1, rtol=1e-6)
    assert (
        ScoreRule("geometric", 0.3, "model").apply(image, cell).tolist()
        == ScoreRule("geometric", 0.3, "model", cam_weight=0.0).apply(image, cell, cam).tolist()
    )
    with pytest.raises(ValueError, match="needs the CAM cell scores"):
        ScoreRule(cam_weight=0.1).apply(image, cell)
    with pytest.raises(ValueError, match="cam_weight 0.5 is outside"):
        ScoreRule(image_weight=0.7, cam_weight=0.5)


# --- TTA and ensembles ----------------------------------------------------------------------
def test_tta_averages_the_eight_flips_and_rotations():
    corner = CellClassifier(lambda batch: np.repeat(batch[:, :1, 0, 0] / 255.0, N_CLASSES, axis=1), 8)
    image = np.zeros((1, 8, 8, 3), np.float32)
    image[0, 0, 0], image[0, 0, -1], image[0, -1, 0], image[0, -1, -1] = 255, 51, 102, 0
    assert corner(image)[0, 0] == pytest.approx(1.0)
    # each corner comes to the top left under two of the eight symmetries
    assert corner.with_tta()(image)[0, 0] == pytest.approx((255 + 51 + 102 + 0) / 4 / 255)
    assert corner.with_tta(["identity", "rot180"])(image)[0, 0] == pytest.approx(0.5)


def test_an_ensemble_averages_its_members_at_their_own_sizes_and_channels():
    seen = []

    def member(size: int, channels: str, value: float) -> CellClassifier:
        def predict(batch):
            seen.append(batch.shape[1:])
            return np.full((len(batch), N_CLASSES), value, np.float32)

        cam = lambda image, mask, ids: np.full((len(ids), N_CLASSES), value * 2, np.float32)  # noqa: E731
        return CellClassifier(predict, size, channels, cam)

    ensemble = CellClassifier.average([member(16, "rgb", 0.2), member(32, "rgby", 0.4)], [3, 1])
    assert (ensemble.image_size, ensemble.channels) == (32, "rgby")
    out = ensemble(np.zeros((5, 32, 32, 4), np.float32))
    np.testing.assert_allclose(out, 0.75 * 0.2 + 0.25 * 0.4, rtol=1e-6)
    assert sorted(seen) == [(16, 16, 3), (32, 32, 4)]
    np.testing.assert_allclose(
        ensemble.cam_scores(np.zeros((9, 9, 4)), np.ones((9, 9), int), np.array([1])),
        2 * (0.75 * 0.2 + 0.25 * 0.4),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="2 models need 2 weights"):
        CellClassifier.average([member(16, "rgb", 0.2), member(32, "rgb", 0.4)], [1.0])
    without_maps = CellClassifier.average([member(16, "rgb", 0.2), CellClassifier(lambda b: b, 16)])
    with pytest.raises(ValueError, match="has no class activation maps"):
        without_maps.cam_scores(np.zeros((9, 9, 3)), np.ones((9, 9), int), np.array([1]))


# --- tuning ---------------------------------------------------------------------------------
def _predictions(rng, images: int = 12) -> tuple[dict, tuple[dict, dict]]:
    """Images of 4 cells, each cell with a class of its own among 0..3; the CAM term knows the cell's class, the
    image term only the image's classes, the cell term nothing."""
    predictions, masks, labels = {}, {}, {}
    for n in range(images):
        mask = np.zeros((20, 20), np.uint16)
        for cell, (r, c) in enumerate(((0, 0), (0, 10), (10, 0), (10, 10)), start=1):
            mask[r + 1 : r + 9, c + 1 : c + 9] = cell
        classes = rng.permutation(4)
        truth = {cell: np.eye(N_CLASSES)[classes[cell - 1]] for cell in range(1, 5)}
        image_probs = np.full(N_CLASSES, 0.05, np.float32)
        image_probs[:4] = 0.9
        cam = np.full((4, N_CLASSES), 0.05, np.float32)
        cam[np.arange(4), classes] = 0.6 + 0.3 * rng.random(4)
        cell_probs = rng.uniform(0.3, 0.7, (4, N_CLASSES)).astype(np.float32)
        predictions[f"i{n}"] = CellPredictions(
            mask, np.arange(1, 5), np.zeros((4, N_CLASSES), np.float32), image_probs, cell_probs, cam
        )
        masks[f"i{n}"], labels[f"i{n}"] = mask, truth
    return predictions, (masks, labels)


def test_tuning_finds_the_informative_term_and_scores_match_the_metric():
    predictions, truth = _predictions(np.random.default_rng(0))
    matches = compare.matches_of(predictions, truth)
    tuned = compare.tune(predictions, matches)
    assert tuned.cam_weight > 0 and tuned.combine == "geometric"
    by_rule = {
        rule: matches.mean_average_precision(compare.scores_under(predictions, rule)) for rule in (tuned, COMBINED_RULE)
    }
    assert by_rule[tuned] > by_rule[COMBINED_RULE] + 0.2
    # the matched cells give the competition metric itself
    rescored = {i: rescore(p, tuned).as_map_input() for i, p in predictions.items()}
    assert by_rule[tuned] == pytest.approx(cell_map(rescored, *truth))
    assert compare.parts([f"i{n}" for n in range(5)], 2) == [["i0", "i2", "i4"], ["i1", "i3"]]
    # cross-tuned: each image under the rule tuned on the other parts, the same rule here (the CAM term wins on every
    # part), and the rule tuned on all of them
    rescored, on_all = compare.cross_tune(predictions, truth, 3)
    assert on_all == tuned and list(rescored) == list(predictions)
    assert matches.mean_average_precision([row for p in rescored.values() for row in p.scores]) > by_rule[COMBINED_RULE]


# --- data sources ---------------------------------------------------------------------------
def test_data_sources_join_in_a_view_and_a_colliding_id_is_named(tmp_path, cli):
    first, second = tmp_path / "competition", tmp_path / "public"
    write_sample(first, images=12, size=48, seed=1, bit_depth=8, test_images=2, progress=False)
    write_sample(second, images=8, size=48, seed=2, bit_depth=8, test_images=0, progress=False)
    table = pd.read_csv(second / "train.csv", dtype=str)
    renamed = {image_id: f"hpa-{image_id}" for image_id in table["ID"]}
    for path in (second / "train").glob("*.png"):
        image_id, _, color = path.name.rpartition("_")
        path.rename(path.with_name(f"{renamed[image_id]}_{color}"))
    table.assign(ID=table["ID"].map(renamed)).to_csv(second / "train.csv", index=False)
    view = combined.combine([first, second], tmp_path / "work")
    assert combined.extra_ids(view) == list(renamed.values())
    assert len(pd.read_csv(view / "train.csv")) == 20 and len(list((view / "train").glob("*.png"))) == 80
    assert combined.combine([first, second], tmp_path / "work") == view  # made again in place

    result = cli(
        "train",
        "--quick",
        "--data",
        first,
        second,
        "--out",
        tmp_path / "run",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--steps-per-epoch",
        "1",
        "--batch-size",
        "4",
    )
    assert result.status == 0, result.err[-2000:]
    saved = run.load_split(tmp_path / "run")
    assert set(renamed.values()) <= set(saved["train"]) and not set(renamed.values()) & set(saved["val"])
    alone = splits.split(*_ids_and_matrix(first), 0.2, 0)[1]
    assert saved["val"] == alone and run.load_config(tmp_path / "run").data.extra_data == [str(second)]
    assert read_predictions(run.RunFolder(tmp_path / "run").oof)[0] == saved["val"]

    table.assign(ID=pd.read_csv(first / "train.csv", dtype=str)["ID"][:8].to_numpy()).to_csv(
        second / "train.csv", index=False
    )
    collided = cli("train", "--quick", "--data", first, second, "--out", tmp_path / "run2")
    clash = pd.read_csv(first / "train.csv", dtype=str)["ID"][0]
    collided.assert_one_error_line(
        f"image {clash} is in both {first / 'train.csv'} and {second / 'train.csv'}: the "
        "IDs of data sources must not collide (rename one source's images)"
    )


def _ids_and_matrix(root):
    from hpa_nb.core.labels import label_matrix
    from hpa_nb.data.competition import load_labels

    frame = load_labels(root)
    return frame["ID"].tolist(), label_matrix(frame["ID"].tolist(), frame["Label"])


# --- fold runs, end to end --------------------------------------------------------------------
@pytest.fixture(scope="module")
def fold_runs(small_sample, tmp_path_factory):
    from hpa_nb.training.config import TrainConfig
    from hpa_nb.training.train import train

    root = tmp_path_factory.mktemp("folds")
    runs = []
    for k in range(2):
        config = TrainConfig.quick_variant(
            data_dir=str(small_sample),
            out_dir=str(root / f"fold{k}"),
            folds=2,
            fold=k,
            image_size=32,
            epochs=1,
            batch_size=4,
            steps_per_epoch=2,
            seed=3,
            verbose=0,
        )
        runs.append(train(config).run_dir)
    return runs


@pytest.mark.slow
def test_fold_runs_hold_out_every_image_once_and_gather_out_of_fold(fold_runs, small_sample, cli, tmp_path):
    held = [run.load_split(folder)["val"] for folder in fold_runs]
    all_ids = pd.read_csv(small_sample / "train.csv", dtype=str)["ID"].tolist()
    assert sorted(held[0] + held[1]) == sorted(all_ids) and not set(held[0]) & set(held[1])
    for folder, ids in zip(fold_runs, held):
        assert read_predictions(run.RunFolder(folder).oof)[0] == ids
    result = cli("folds", *fold_runs, "--out", tmp_path / "oof.csv")
    assert result.status == 0, result.err[-2000:]
    assert "out of fold" in result.out and f"{len(all_ids)} out-of-fold images from 2 runs" in result.err
    ids, scores = read_predictions(tmp_path / "oof.csv")
    assert sorted(ids) == sorted(all_ids)
    gathered = folds.gather(fold_runs)
    by_id = dict(zip(*read_predictions(run.RunFolder(fold_runs[1]).oof)))
    np.testing.assert_allclose(gathered.y_score[gathered.ids.index(held[1][0])], by_id[held[1][0]], rtol=1e-6)
    cli("folds", fold_runs[0]).assert_one_error_line("folds: no run of fold 1 of 2 among the 1 given")
    refused = cli("train", "--resume", "--out", fold_runs[0], "--fold", "1")
    assert refused.status == 2 and "it was trained with fold=0, not 1" in refused.errors[0]
    mixed = cli("evaluate", "--model", *fold_runs)
    assert mixed.status == 2 and "holds out other images than" in mixed.errors[0]
    both = cli(
        "evaluate",
        "--model",
        *fold_runs,
        "--split",
        "all",
        "--data",
        small_sample,
        "--weights",
        "1",
        "3",
        "--out",
        tmp_path / "ensemble",
    )
    assert both.status == 0, both.err[-2000:]
    metrics = json.loads((tmp_path / "ensemble" / "metrics.json").read_text())
    assert metrics["weights"] == [0.25, 0.75] and metrics["images"] == len(all_ids)


@pytest.mark.slow
def test_submit_and_compare_take_ensembles_tta_and_the_cam_score(
    fold_runs, trained_cell_run, small_sample, cli, tmp_path
):
    compared = cli(
        "compare",
        "--model",
        *fold_runs,
        "--cell-model",
        trained_cell_run,
        trained_cell_run,
        "--data",
        small_sample,
        "--segmentation",
        "masks",
        "--out",
        tmp_path / "rule.json",
    )
    assert compared.status == 0, compared.err[-2000:]
    rows = [line for line in compared.out.splitlines() if line.strip().startswith(("image", "cell", "CAM", "ensemble"))]
    names = [
        (found.group(1), found.group(2) == "yes") for found in (re.match(r"\s*(.+?)\s+(yes|no)\s", row) for row in rows)
    ]
    single = [
        "image model",
        "cell model",
        "CAM",
        "image × cell",
        "image × cell, edge cells × 0",
        "image × cell × CAM, tuned",
    ]
    ensemble = ["ensemble of 2 image and 2 cell runs, image × cell", "ensemble of 2 image and 2 cell runs, tuned"]
    assert names == (
        [(n, False) for n in single + ensemble] + [(n, True) for n in single[1:] + ensemble if n != "CAM"]
    ), names
    rule = json.loads((tmp_path / "rule.json").read_text())
    assert {"image_weight", "cam_weight", "partial_scale", "combine"} <= set(rule)

    written = cli(
        "submit",
        "--model",
        *fold_runs,
        "--cell-model",
        trained_cell_run,
        "--data",
        small_sample,
        "--out",
        tmp_path / "s.csv",
        "--tta",
        "--rule",
        tmp_path / "rule.json",
        "--cam-weight",
        "0.1",
    )
    assert written.status == 0, written.err[-2000:]
    assert "an ensemble of 2 image runs" in written.err and "CAM weight 0.1" in written.err and "TTA ×8" in written.err
    submission = pd.read_csv(tmp_path / "s.csv", keep_default_na=False)
    assert submission["ID"].tolist() == pd.read_csv(small_sample / "sample_submission.csv", dtype=str)["ID"].tolist()


@pytest.mark.slow  # fold_runs trains two folds
def test_an_ensemble_scores_cells_with_each_members_cam(fold_runs):
    members = [scoring.load_classifier(folder) for folder in fold_runs]
    ensemble = CellClassifier.average(members)
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 255, (48, 40, 3)).astype(np.float32)
    mask = np.zeros((48, 40), np.uint16)
    mask[2:20, 3:30], mask[25:45, 5:35] = 1, 2
    rule = ScoreRule("geometric", 0.2, "model", cam_weight=0.5)
    cells = predict_cells(ensemble, image, mask, rule)
    expected = np.mean([member.cam_scores(image, mask, np.array([1, 2])) for member in members], axis=0)
    np.testing.assert_allclose(cells.cam_probs, expected, rtol=1e-5)
    image_probs = np.mean([member(np.stack([scoring.resize_image(image, 32)]))[0] for member in members], axis=0)
    np.testing.assert_allclose(cells.image_probs, image_probs, rtol=1e-5)
