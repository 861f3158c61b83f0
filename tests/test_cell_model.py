"""The cell model: trained on tiles split by image as the image run is, and combined with the image model."""

from __future__ import annotations

import dataclasses
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from hpa_nb.cells import compare, scoring
from hpa_nb.cells.relabel import refine, relabel
from hpa_nb.cells.scoring import CellClassifier, ScoreRule, predict_cells, rescore
from hpa_nb.core.labels import N_CLASSES, NEGATIVE, parse_label
from hpa_nb.data import pipeline, tiles
from hpa_nb.data.crops import cell_crops, partial_cells
from hpa_nb.training import run
from hpa_nb.training.config import TrainConfig
from hpa_nb.training.train import train


def test_a_cell_run_keeps_the_image_runs_split_and_every_cell_on_its_images_side(trained_run, trained_cell_run):
    image_split, cell_split = run.load_split(trained_run), run.load_split(trained_cell_run)
    assert cell_split == image_split  # split.csv holds image IDs for both levels
    info = run.load_info(trained_cell_run)
    assert info["level"] == "cell" and info["val_images"] > len(image_split["val"])  # counted in cells
    manifest = tiles.read_manifest(info["tiles"])
    assert info["train_images"] + info["val_images"] == manifest["count"]
    assert info["val_images"] == len(tiles.tile_keys(manifest, image_split["val"]))


def test_tiles_of_other_data_or_no_tiles_stop_a_cell_run_in_one_line(small_sample, trained_cell_run, tmp_path, cli):
    root = tmp_path / "data"
    shutil.copytree(small_sample, root, ignore=shutil.ignore_patterns("tiles", "shards"))
    result = cli("train", "--quick", "--level", "cell", "--data", root, "--out", tmp_path / "r")
    result.assert_one_error_line(
        f"a cell run needs cell tiles: none in {root / 'tiles'}; write them first "
        f"(python -m hpa_nb tiles --src {root}) or name them with --tiles"
    )
    frame = pd.read_csv(root / "train.csv", dtype=str)
    changed = frame["ID"][0]
    frame.loc[0, "Label"] = "11" if frame["Label"][0] != "11" else "12"
    frame.to_csv(root / "train.csv", index=False)
    tile_dir = run.load_info(trained_cell_run)["tiles"]
    result = cli("train", "--quick", "--level", "cell", "--data", root, "--tiles", tile_dir, "--out", tmp_path / "r")
    assert result.status == 2 and len(result.errors) == 1 and changed in result.errors[0]
    assert "the tiles were written from other data" in result.errors[0]


def test_each_model_is_loaded_for_its_own_level(trained_run, trained_cell_run):
    assert scoring.load_classifier(trained_cell_run, level="cell").image_size == 32
    with pytest.raises(ValueError, match="holds a cell-level model, not the image-level model"):
        scoring.load_classifier(trained_cell_run)
    with pytest.raises(ValueError, match="holds a image-level model, not the cell-level model"):
        scoring.load_classifier(trained_run, level="cell")


class Recorder:
    """A classifier that remembers its inputs and scores class 0 by a batch's mean brightness."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(batch.copy())
        scores = np.full((len(batch), N_CLASSES), 0.5, np.float32)
        scores[:, 0] = batch.reshape(len(batch), -1).mean(axis=1) / 255
        return scores


def test_the_cell_model_scores_each_cells_tile_and_the_rule_combines_it_with_the_image_score():
    image = np.zeros((30, 40, 3), np.float32)
    mask = np.zeros((30, 40), np.uint16)
    mask[2:12, 2:12], image[2:12, 2:12] = 1, 200.0
    mask[15:28, 20:38], image[15:28, 20:38] = 2, 50.0
    image_model, cell_recorder = Recorder(), Recorder()
    rgby = np.concatenate([image, np.full((30, 40, 1), 7.0, np.float32)], axis=-1)
    cell_model = CellClassifier(cell_recorder, 16, "rgby")
    rule = ScoreRule(combine="geometric", image_weight=0.5, negative="model")
    scored = predict_cells(CellClassifier(image_model, 24, "rgb"), image, mask, rule, cell_model, rgby)
    assert [b.shape for b in image_model.batches] == [(1, 24, 24, 3)]  # the image once, no crops of its own
    np.testing.assert_array_equal(cell_recorder.batches[0], cell_crops(rgby, mask, 16, [1, 2])[1])  # the tiles
    image_score, tile_scores = image_model(image_model.batches[0])[0, 0], cell_recorder(cell_recorder.batches[0])[:, 0]
    np.testing.assert_allclose(scored.scores[:, 0], np.sqrt(image_score * tile_scores), rtol=1e-5)
    assert scored.scores[0, 0] > scored.scores[1, 0]  # the bright cell ranks first, from its tile


def test_a_rescored_rule_gives_what_predicting_under_it_gives():
    image = np.zeros((30, 40, 3), np.float32)
    mask = np.zeros((30, 40), np.uint16)
    mask[2:12, 2:12], image[2:12, 2:12] = 1, 200.0
    mask[15:28, 20:38], image[15:28, 20:38] = 2, 50.0
    mask[0:3, 30:34] = 3  # cut by the edge and small: partial
    image_model, cell_model = CellClassifier(Recorder(), 24, "rgb"), CellClassifier(Recorder(), 16, "rgb")
    first = predict_cells(image_model, image, mask, ScoreRule(combine="geometric", image_weight=0.3), cell_model)
    for rule in (
        ScoreRule(combine="geometric", image_weight=0.0),
        ScoreRule(image_weight=0.5, partial_scale=0.0),
        ScoreRule(combine="geometric", image_weight=0.3, negative="model"),
    ):
        direct = predict_cells(image_model, image, mask, rule, cell_model)
        np.testing.assert_allclose(rescore(first, rule).scores, direct.scores, rtol=1e-6)
    assert rescore(first, ScoreRule(image_weight=0.5, partial_scale=0.0)).scores[2].max() == 0
    with pytest.raises(ValueError, match="no cell probabilities"):
        rescore(dataclasses.replace(first, cell_probs=None), ScoreRule())


def test_partial_cells_are_scaled_down_on_request():
    mask = np.zeros((40, 40), np.uint16)
    mask[5:20, 5:20] = 1  # whole
    mask[22:37, 5:20] = 2  # whole
    mask[0:4, 25:35] = 3  # cut by the top edge and small: partial
    mask[20:40, 22:40] = 4  # touches the edge but large: kept
    assert partial_cells(mask, np.array([1, 2, 3, 4])).tolist() == [False, False, True, False]
    flat = CellClassifier(lambda batch: np.full((len(batch), N_CLASSES), 0.8, np.float32), 16)
    image = np.ones((40, 40, 3), np.float32)
    plain = predict_cells(flat, image, mask, ScoreRule(negative="model"))
    halved = predict_cells(flat, image, mask, ScoreRule(negative="model", partial_scale=0.5))
    np.testing.assert_allclose(halved.scores[[0, 1, 3]], plain.scores[[0, 1, 3]])
    np.testing.assert_allclose(halved.scores[2], plain.scores[2] * 0.5)
    with pytest.raises(ValueError, match="partial_scale"):
        ScoreRule(partial_scale=1.5)


def test_submit_with_a_cell_model_and_the_three_way_comparison(
    small_sample, trained_run, trained_cell_run, tmp_path, cli
):
    result = cli(
        "submit",
        "--model",
        trained_run,
        "--cell-model",
        trained_cell_run,
        "--data",
        small_sample,
        "--out",
        tmp_path / "s.csv",
    )
    assert result.status == 0, result.err[-2000:]
    written = pd.read_csv(tmp_path / "s.csv")
    assert written["ID"].tolist() == pd.read_csv(small_sample / "sample_submission.csv")["ID"].tolist()
    assert f"and cell run {trained_cell_run}" in result.err and "under the image × cell rule: geometric" in result.err
    wrong = cli("submit", "--model", trained_cell_run, "--data", small_sample, "--out", tmp_path / "t.csv")
    assert wrong.status == 2 and "holds a cell-level model" in wrong.errors[0]
    comparison = compare.compare_models(
        scoring.load_classifier(trained_run),
        scoring.load_classifier(trained_cell_run, level="cell"),
        small_sample,
        use_truth_masks=True,
        progress=False,
        tta=False,
    )
    table = comparison.table()
    assert table["scoring"].tolist() == [
        "image model",
        "cell model",
        "CAM",
        "image × cell",
        "image × cell, edge cells × 0",
        "image × cell × CAM, tuned",
    ]
    values = table[["cell mAP (challenge)", "cell mAP (all classes)"]].to_numpy()
    assert ((values >= 0) & (values <= 1)).all()
    reported = comparison.images[0]
    assert not np.allclose(
        comparison["cell model"].predictions[reported].scores, comparison["image model"].predictions[reported].scores
    )
    assert not np.allclose(
        comparison["CAM"].predictions[reported].scores, comparison["image model"].predictions[reported].scores
    )
    # the hosts' advice: cells cut off by the edge get no score; every other cell keeps its combined score
    # (this sample's cells are whole: test_cells scores partial ones)
    for image_id, combined in comparison["image × cell"].predictions.items():
        dropped = comparison["image × cell, edge cells × 0"].predictions[image_id]
        partial = partial_cells(combined.mask, combined.cell_ids)
        np.testing.assert_allclose(dropped.scores[~partial], combined.scores[~partial], rtol=1e-6)
        assert not dropped.scores[partial].any()
    printed = cli(
        "compare",
        "--model",
        trained_run,
        "--cell-model",
        trained_cell_run,
        "--data",
        small_sample,
        "--segmentation",
        "masks",
        "--no-tta",
    )
    assert printed.status == 0, printed.err[-2000:]
    rows = [re.match(r"\s*(.+?)\s+no\s+([\d.]+)\s+([\d.]+)\s", line) for line in printed.out.splitlines()]
    rows = [row for row in rows if row]
    assert [row.group(1) for row in rows] == table["scoring"].tolist()
    np.testing.assert_allclose(np.array([row.groups()[1:] for row in rows], float), values, atol=6e-4)
    no_truth = cli("compare", "--model", trained_run, "--cell-model", trained_cell_run, "--data", tmp_path)
    no_truth.assert_one_error_line(f"{tmp_path / 'cells.csv'} does not exist: compare needs true cells (a sample)")


def test_refine_keeps_each_label_on_its_likeliest_cell_and_makes_the_rest_negative():
    def scores(c3: float, c5: float) -> np.ndarray:
        row = np.full(N_CLASSES, 0.9, np.float32)
        row[3], row[5] = c3, c5
        return row

    tiles = {"a_1": scores(0.8, 0.2), "a_2": scores(0.4, 0.2), "a_3": scores(0.1, 0.6), "b_1": scores(0.5, 0.5)}
    labels = {"a": "3|5", "b": "18"}
    linear = {
        "a_1": {3: 1.0, 5: 1 / 3, 18: 0.0},
        "a_2": {3: 0.5, 5: 1 / 3, 18: 0.5},
        "a_3": {3: 0.125, 5: 1.0, 18: 0.0},
        "b_1": {18: 1.0},
    }
    cubed = {
        "a_1": {3: 1.0, 5: 1 / 27, 18: 0.0},
        "a_2": {3: 0.125, 5: 1 / 27, 18: 0.875},
        "a_3": {3: 1 / 512, 5: 1.0, 18: 0.0},
        "b_1": {18: 1.0},
    }
    for sharpness, expected in ((1.0, linear), (3.0, cubed)):
        targets = refine(tiles, labels, sharpness)
        for key, classes in expected.items():
            want = np.zeros(N_CLASSES, np.float32)
            for c, value in classes.items():
                want[c] = value
            np.testing.assert_allclose(targets[key], want, atol=1e-6, err_msg=f"{key} at sharpness {sharpness}")
    np.testing.assert_allclose(refine(tiles, labels)["a_2"], refine(tiles, labels, 3.0)["a_2"])  # the measured default


def test_targets_replace_the_stored_labels_of_the_records_they_name(small_sample, trained_cell_run):
    tile_dir = run.load_info(trained_cell_run)["tiles"]
    manifest = tiles.read_manifest(tile_dir)
    keys = tiles.tile_keys(manifest)[:6]
    targets = {key: np.full(N_CLASSES, index / 10, np.float32) for index, key in enumerate(keys[:3])}
    stream = pipeline.training_dataset(
        small_sample,
        keys,
        32,
        "rgb",
        batch_size=6,
        shards=tile_dir,
        stream=pipeline.Stream(augment=False),
        targets=targets,
    )
    _, labels = next(iter(stream))
    stored = {key: tiles.image_labels(manifest)[key.rpartition("_")[0]] for key in keys[3:]}
    rows = {tuple(np.round(row, 3)) for row in labels.numpy()}
    assert {tuple(np.round(t, 3)) for t in targets.values()} <= rows

    assert {tuple(parse_label(text)) for text in stored.values()} <= rows


@pytest.mark.slow
def test_a_relabelled_cell_run_trains_its_folds_then_on_their_targets(small_sample, trained_cell_run, tmp_path):
    tile_dir = run.load_info(trained_cell_run)["tiles"]
    config = TrainConfig.quick_variant(
        data_dir=str(small_sample),
        out_dir=str(tmp_path / "relabelled"),
        level="cell",
        tiles=tile_dir,
        relabel=True,
        image_size=32,
        epochs=1,
        batch_size=4,
        steps_per_epoch=2,
        val_fraction=0.25,
        seed=3,
        verbose=0,
    )
    with pytest.raises(FileNotFoundError, match="run the relabel step first"):
        train(config)  # preparing a run never trains its fold models itself
    assert not run.RunFolder(tmp_path / "relabelled").fold(0).exists()
    targets_file = relabel(config)
    out = train(config).run_dir
    assert targets_file == run.RunFolder(out).targets and targets_file.is_file()  # kept by the fresh run
    split = run.load_split(out)
    assert split == run.load_split(trained_cell_run)
    folds = [run.load_split(run.RunFolder(out).fold(k)) for k in range(2)]
    assert sorted(folds[0]["val"] + folds[1]["val"]) == sorted(split["train"])  # every training image held out once
    assert not set(folds[0]["val"]) & set(folds[0]["train"])
    targets = run.load_targets(out)
    manifest = tiles.read_manifest(tile_dir)
    assert set(targets) == set(tiles.tile_keys(manifest, split["train"]))
    labels = tiles.image_labels(manifest)

    for image_id in split["train"][:10]:
        weak = parse_label(labels[image_id])
        block = np.stack([targets[key] for key in tiles.tile_keys(manifest, [image_id])])
        assert (block[:, weak == 0][:, :-1] == 0).all() or weak[NEGATIVE]  # no class the image lacks
        if not weak[NEGATIVE]:
            assert np.allclose(block[:, (weak > 0)].max(axis=0), 1.0)  # each label kept on its likeliest cell
    before = (out / run.TARGETS_FILE).read_text()
    resumed = train(config.replace(resume=True, epochs=2)).run_dir  # reads its targets back
    assert (resumed / run.TARGETS_FILE).read_text() == before
