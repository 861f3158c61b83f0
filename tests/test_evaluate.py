"""evaluate: held-out IDs reproduced exactly, files written, predictions.csv round trip, TTA, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hpa_nb import cli
from hpa_nb.core.labels import LABEL_NAMES, N_CLASSES, label_matrix
from hpa_nb.core.metrics import f1_score, image_metrics
from hpa_nb.training import run as run_folder
from hpa_nb.training.evaluate import evaluate, format_table
from hpa_nb.training.predictions import DIHEDRAL_TRANSFORMS, predict, read_predictions, write_predictions
from hpa_nb.training.run import load_split


def _val_ids(run: Path) -> list[str]:
    return load_split(run)["val"]


def test_cli_evaluates_exactly_the_held_out_images(trained_run, small_sample, tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--model", str(trained_run), "--data", str(small_sample), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "support" in printed and LABEL_NAMES[17] in printed and "macro ROC AUC" in printed

    ids, probabilities = read_predictions(out / "predictions.csv")
    assert sorted(ids) == sorted(_val_ids(trained_run))
    assert probabilities.shape == (len(ids), N_CLASSES) and np.all((probabilities >= 0) & (probabilities <= 1))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["images"] == len(ids)
    assert [entry["name"] for entry in metrics["classes"]] == list(LABEL_NAMES)
    absent = [entry for entry in metrics["classes"] if entry["support"] == 0]
    assert absent, "10 held-out images cannot hold all 19 classes"
    assert all(entry["roc_auc"] is None and entry["f1"] is None for entry in absent)
    assert set(metrics["thresholds"]) == set(LABEL_NAMES)
    for name in ("per_class_scores.html", "precision_recall.html", "training_history.png"):
        assert (out / name).is_file()


def test_a_changed_split_is_refused(trained_run, small_sample, tmp_path):
    altered = tmp_path / "run"
    altered.mkdir()

    for name in (run_folder.MODEL_FILE, run_folder.CONFIG_FILE):
        (altered / name).write_bytes((trained_run / name).read_bytes())
    split = run_folder.load_split(trained_run)
    run_folder.write_split(altered, split["train"] + split["val"][:1], split["val"][1:])
    with pytest.raises(ValueError, match="differs from .*split.csv.*data folder changed"):
        evaluate(altered, small_sample, tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def test_split_all_with_tta_and_given_thresholds_scores_every_labelled_image(trained_run, small_sample, tmp_path):
    thresholds = tmp_path / "val_metrics.json"
    thresholds.write_text(json.dumps({"thresholds": {name: 0.5 for name in LABEL_NAMES}}))
    result = evaluate(
        trained_run, small_sample, tmp_path / "all", split="all", tta=True, batch_size=16, thresholds=thresholds
    )
    labels = pd.read_csv(small_sample / "train.csv", dtype={"ID": str})
    assert sorted(result.ids) == sorted(labels["ID"])
    expected = label_matrix(labels["ID"], labels["Label"])[[labels["ID"].tolist().index(i) for i in result.ids]]
    np.testing.assert_array_equal(result.y_true, expected)
    assert result.metrics["tta"] is True and len(result.metrics["tta_transforms"]) == 8
    assert result.metrics["macro_roc_auc"] is not None
    assert set(result.metrics["thresholds"].values()) == {0.5}
    assert result.metrics["classes"][0]["f1"] == pytest.approx(
        f1_score(result.y_true[:, 0], result.y_score[:, 0] >= 0.5)
    )
    assert list(result.table().index) == list(LABEL_NAMES)


def test_a_thresholds_file_without_thresholds_is_refused(trained_run, small_sample, tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"map": 0.5}))
    with pytest.raises(ValueError, match="no per-class thresholds"):
        evaluate(trained_run, small_sample, tmp_path / "out", split="all", thresholds=tmp_path / "metrics.json")


class _CornerModel:
    """Predicts every class as the image's top-left pixel, so TTA's effect is known exactly."""

    def predict_on_batch(self, batch: np.ndarray) -> np.ndarray:
        return np.repeat(batch[:, 0, 0, :1], N_CLASSES, axis=1)


def test_tta_averages_the_eight_symmetries_of_the_square():
    image = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    outputs = {name: transform(image) for name, transform in DIHEDRAL_TRANSFORMS.items()}
    assert len({array.tobytes() for array in outputs.values()}) == 8
    dataset = [(image, np.zeros((1, N_CLASSES), np.float32), np.array([b"a"]))]
    _, _, plain = predict(_CornerModel(), dataset)
    _, _, averaged = predict(_CornerModel(), dataset, tta=True)
    assert plain[0, 0] == 0.0
    # Each corner (0, 3, 12, 15) comes to the top left under two of the eight symmetries.
    assert averaged[0, 0] == pytest.approx((0 + 3 + 12 + 15) / 4)


def test_predictions_round_trip_keeps_ids_columns_and_order(tmp_path):
    rng = np.random.default_rng(1)
    ids = ["b", "a", "c-3", "000123"]
    probabilities = rng.random((4, N_CLASSES)).astype(np.float32)
    probabilities[0, 0] = 3e-9  # tiny values keep their precision
    path = write_predictions(tmp_path / "predictions.csv", ids, probabilities)
    assert pd.read_csv(path).columns.tolist() == ["ID", *LABEL_NAMES]
    read_ids, read_probabilities = read_predictions(path)
    assert read_ids == ids
    np.testing.assert_allclose(read_probabilities, probabilities, rtol=1e-6)
    pd.read_csv(path)[["ID", *reversed(LABEL_NAMES)]].to_csv(tmp_path / "shuffled.csv", index=False)
    with pytest.raises(ValueError, match="out of order"):
        read_predictions(tmp_path / "shuffled.csv")
    with pytest.raises(ValueError, match="4 IDs"):
        write_predictions(tmp_path / "bad.csv", ids, probabilities[:, :5])


def test_table_marks_undefined_scores():
    truth = np.zeros((4, N_CLASSES), np.float32)
    truth[[0, 1], 0] = 1
    table = format_table(image_metrics(truth, np.linspace(0, 1, 4 * N_CLASSES).reshape(4, N_CLASSES)))
    nucleoli_row = next(line for line in table.splitlines() if line.startswith("Nucleoli "))
    assert nucleoli_row.split()[-4:] == ["–"] * 4


def test_cli_missing_run_folder_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["evaluate", "--model", str(tmp_path / "nope"), "--data", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: run folder") and "nope" in error[0]
