"""hpa_nb.cells.submit: mask encoding, the submission file (every ID, PNG sizes, decodable masks) and the CLI verb."""

from __future__ import annotations

import base64
import shutil
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from hpa_nb.cells import cutting, scoring
from hpa_nb.cells.scoring import CellClassifier, ScoreRule
from hpa_nb.cells.submit import (
    decode_mask,
    encode_mask,
    evaluate_cells,
    parse_prediction_string,
    score_cells,
    submit,
    write_predictions,
    write_submission,
)
from hpa_nb.cli import main
from hpa_nb.core.labels import N_CLASSES
from hpa_nb.segmentation.backends import segment
from hpa_nb.segmentation.images import read_channels


def coco_decode(text: str, height: int, width: int) -> np.ndarray:
    """The competition's own decoding path, written out here independently of `decode_mask`."""
    counts = zlib.decompress(base64.b64decode(text))
    return coco_mask.decode({"size": [height, width], "counts": counts})


def _channel_means(batch: np.ndarray) -> np.ndarray:
    """Deterministic probabilities from channel means, different for every class."""
    means = batch.mean(axis=(1, 2)) / 255.0  # [N, C]
    ramp = np.linspace(0.05, 0.95, N_CLASSES)
    return np.clip(ramp[None, :] * (0.5 + means[:, :1]), 0.0, 1.0).astype(np.float32)


fake_classifier = CellClassifier(_channel_means, 32, "rgb")


def _write_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def handmade(tmp_path_factory) -> Path:
    """Three test images of different sizes (one 16-bit, one non-square), two cells each."""
    root = tmp_path_factory.mktemp("handmade")
    (root / "test").mkdir()
    rows = []
    for index, (height, width, bits) in enumerate([(48, 48, 8), (64, 80, 16), (72, 72, 8)]):
        image_id = f"img{index}"
        yy, xx = np.mgrid[:height, :width]
        blue = np.zeros((height, width))
        red = np.zeros((height, width))
        for cy, cx in ((height * 0.3, width * 0.3), (height * 0.7, width * 0.7)):
            distance = np.hypot(yy - cy, xx - cx)
            blue += 200 * (distance < height * 0.09)
            red += 150 * (distance < height * 0.22)
        scale = 257 if bits == 16 else 1
        dtype = np.uint16 if bits == 16 else np.uint8
        for color, array in (("red", red), ("green", red / 2), ("blue", blue), ("yellow", red / 3)):
            _write_png(root / "test" / f"{image_id}_{color}.png", (np.clip(array, 0, 255) * scale).astype(dtype))
        rows.append((image_id, 0, 0, ""))  # wrong sizes on purpose: the PNG's must win
    pd.DataFrame(rows, columns=["ID", "ImageWidth", "ImageHeight", "PredictionString"]).iloc[::-1].to_csv(
        root / "sample_submission.csv", index=False
    )
    return root


def test_masks_round_trip_through_the_competition_encoding():
    rng = np.random.default_rng(0)
    masks = [rng.random((37, 53)) > 0.7, np.zeros((20, 30), bool), np.ones((16, 16), bool)]
    blob = np.zeros((300, 200), bool)
    blob[40:180, 20:150] = True
    masks.append(blob)
    for mask in masks:
        text = encode_mask(mask)
        assert text.isascii() and " " not in text
        np.testing.assert_array_equal(coco_decode(text, *mask.shape).astype(bool), mask)
        np.testing.assert_array_equal(decode_mask(text, *mask.shape), mask)


def test_written_submission_has_every_id_png_sizes_and_decodable_masks(handmade, tmp_path):
    out = write_submission(
        CellClassifier(_channel_means, 32, "rgby"),
        data_dir=handmade,
        out_csv=tmp_path / "sub" / "submission.csv",
        progress=False,
    )
    table = pd.read_csv(out, dtype={"ID": str}, keep_default_na=False)
    assert list(table.columns) == ["ID", "ImageWidth", "ImageHeight", "PredictionString"]
    assert table["ID"].tolist() == ["img2", "img1", "img0"]  # sample_submission's order
    assert list(zip(table["ImageWidth"], table["ImageHeight"])) == [(72, 72), (80, 64), (48, 48)]
    assert not list(tmp_path.glob("sub/.*tmp"))  # the temporary file was renamed away
    for row in table.itertuples():
        pixels = read_channels(handmade / "test", row.ID, ("red", "blue", "yellow"))
        expected = segment(pixels["red"], pixels["blue"], pixels["yellow"])
        assert expected.max() == 2
        tokens = row.PredictionString.split()
        assert len(tokens) == 3 * 2 * N_CLASSES  # two cells, every class by default
        for label_text, confidence_text, mask_text in zip(tokens[::3], tokens[1::3], tokens[2::3]):
            assert 0 <= int(label_text) < N_CLASSES and 0.0 <= float(confidence_text) <= 1.0
            decoded = coco_decode(mask_text, row.ImageHeight, row.ImageWidth)
            assert decoded.shape == (row.ImageHeight, row.ImageWidth)
            cell_id = np.bincount(expected[decoded.astype(bool)]).argmax()
            np.testing.assert_array_equal(decoded.astype(bool), expected == cell_id)
        per_cell = parse_prediction_string(row.PredictionString, row.ImageHeight, row.ImageWidth)
        assert sorted({label for label, _, _ in per_cell}) == list(range(N_CLASSES))


def test_confidence_floor_and_image_only_rule(handmade, tmp_path):
    out = write_submission(
        fake_classifier,
        handmade,
        tmp_path / "floor.csv",
        confidence_floor=0.5,
        rule=ScoreRule(image_weight=1.0, negative="model"),
        ids=["img0"],
        progress=False,
    )
    row = pd.read_csv(out).iloc[0]
    kept = parse_prediction_string(row.PredictionString, row.ImageHeight, row.ImageWidth)
    assert kept and all(confidence >= 0.5 for _, confidence, _ in kept)
    assert len(kept) < 2 * N_CLASSES


def test_missing_test_image_is_named(handmade, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope_red.png"):
        write_submission(fake_classifier, handmade, tmp_path / "x.csv", ids=["nope"], progress=False)
    assert not (tmp_path / "x.csv").exists()


@pytest.fixture(scope="module")
def odd_green(handmade, tmp_path_factory) -> Path:
    """One test image (img0, 48 × 48 px) whose green PNG is 40 × 48 px."""
    root = tmp_path_factory.mktemp("odd_green")
    (root / "test").mkdir()
    for color in ("red", "green", "blue", "yellow"):
        shutil.copy(handmade / "test" / f"img0_{color}.png", root / "test")
    _write_png(root / "test" / "img0_green.png", np.zeros((48, 40), np.uint8))
    pd.DataFrame([("img0", 0, 0, "")], columns=["ID", "ImageWidth", "ImageHeight", "PredictionString"]).to_csv(
        root / "sample_submission.csv", index=False
    )
    return root


def test_channels_of_different_sizes_name_the_image_and_file(odd_green, tmp_path):
    with pytest.raises(ValueError, match=r"image img0: .*img0_green\.png is 40×48 px, but img0_red\.png is 48×48"):
        write_submission(fake_classifier, odd_green, tmp_path / "x.csv", progress=False)
    assert not (tmp_path / "x.csv").exists()


def test_submit_covers_every_sample_submission_id(small_sample, trained_run, tmp_path):
    out = submit(trained_run, small_sample, tmp_path / "submission.csv", progress=False)
    table = pd.read_csv(out, keep_default_na=False)
    expected = pd.read_csv(small_sample / "sample_submission.csv")
    assert table["ID"].tolist() == expected["ID"].tolist()
    assert (table["PredictionString"].str.len() > 0).all()  # every small test image has cells
    for row in table.itertuples():
        with Image.open(small_sample / "test" / f"{row.ID}_red.png") as image:
            assert (row.ImageWidth, row.ImageHeight) == image.size
        for _, _confidence, mask in parse_prediction_string(row.PredictionString, row.ImageHeight, row.ImageWidth):
            assert mask.shape == (row.ImageHeight, row.ImageWidth) and mask.any()


def test_cli_submit(small_sample, trained_run, tmp_path, capsys):
    out = tmp_path / "cli.csv"
    assert (
        main(
            [
                "submit",
                "--model",
                str(trained_run),
                "--data",
                str(small_sample),
                "--out",
                str(out),
                "--image-weight",
                "1",
            ]
        )
        == 0
    )
    assert len(pd.read_csv(out)) == len(pd.read_csv(small_sample / "sample_submission.csv"))
    assert main(["submit", "--model", str(tmp_path / "missing"), "--data", str(small_sample)]) == 2
    assert "model.keras" in capsys.readouterr().err
    assert (
        main(
            [
                "submit",
                "--model",
                str(trained_run),
                "--data",
                str(small_sample),
                "--out",
                str(out),
                "--image-weight",
                "2",
            ]
        )
        == 2
    )


def test_cli_submit_names_an_image_with_odd_channel_sizes(odd_green, trained_run, tmp_path, capsys):
    assert (
        main(
            [
                "submit",
                "--model",
                str(trained_run),
                "--data",
                str(odd_green),
                "--out",
                str(tmp_path / "x.csv"),
                "--image-weight",
                "1",
            ]
        )
        == 2
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "img0_green.png is 40×48 px" in errors[0]


def test_evaluate_cells_scores_the_sample_test_images(small_sample):
    result = evaluate_cells(fake_classifier, small_sample, progress=False)
    test_ids = pd.read_csv(small_sample / "sample_submission.csv")["ID"].tolist()
    assert sorted(result.predictions) == sorted(test_ids)
    assert sorted(result.cell_maps) == ["all_classes", "challenge"] and result.segmentation.recall >= 0.9
    assert all(0.0 <= value <= 1.0 for value in result.cell_maps.values())
    # Dropping detections of classes an image lacks can only remove false positives.
    assert result.cell_maps["challenge"] >= result.cell_maps["all_classes"]
    assert len(result.table()) == sum(ap is not None for ap in result.average_precisions["challenge"]) > 0
    assert "(challenge reading)" in str(result) and "(all classes)" in str(result)
    truth = evaluate_cells(fake_classifier, small_sample, use_truth_masks=True, progress=False)
    assert truth.segmentation.mean_iou == 1.0 and truth.segmentation.recall == 1.0


def test_scored_cells_are_written_and_scored_without_segmenting_again(small_sample, tmp_path, monkeypatch):
    test_ids = pd.read_csv(small_sample / "sample_submission.csv")["ID"].tolist()
    predictions = scoring.predict_images(fake_classifier, small_sample, test_ids, progress=False)
    assert list(predictions) == test_ids
    monkeypatch.setattr(cutting, "segment", lambda *args, **kwargs: pytest.fail("segmented twice"))
    written = write_predictions(predictions, tmp_path / "submission.csv")
    table = pd.read_csv(written, keep_default_na=False)
    assert table["ID"].tolist() == test_ids
    for row in table.itertuples():
        cells_found = predictions[row.ID]
        assert (row.ImageHeight, row.ImageWidth) == cells_found.mask.shape
        assert (
            len(parse_prediction_string(row.PredictionString, row.ImageHeight, row.ImageWidth))
            == len(cells_found.cell_ids) * N_CLASSES
        )
    scored = score_cells(predictions, small_sample)
    monkeypatch.undo()
    fresh = evaluate_cells(fake_classifier, small_sample, test_ids, progress=False)
    assert scored.cell_maps == pytest.approx(fresh.cell_maps) and scored.segmentation == fresh.segmentation
    streamed = write_submission(fake_classifier, small_sample, tmp_path / "streamed.csv", progress=False)
    assert streamed.read_bytes() == written.read_bytes()  # one image at a time, the same file


def test_cells_encoded_from_their_columns_are_the_bytes_of_the_whole_image_encoding():
    """`encode_cells` counts each cell's runs in the columns its box spans; the result is `encode_mask`'s, byte for
    byte, for cells at every edge, cells of one pixel, and ids with no pixel at all."""
    from hpa_nb.cells.masks import encode_cells

    rng = np.random.default_rng(0)
    for _ in range(30):
        height, width = rng.integers(5, 60, 2)
        mask = rng.integers(0, 6, (height, width)).astype(np.uint16)
        mask[rng.random((height, width)) < 0.5] = 0
        ids = np.arange(1, 8)  # 6 and 7 have no pixel
        assert encode_cells(mask, ids) == tuple(encode_mask(mask == cell_id) for cell_id in ids)
