"""The synthetic sample: competition layout, determinism, labels, masks and label-driven green patterns."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from scipy import ndimage

from hpa_nb.core.labels import LABEL_NAMES, N_CLASSES, NEGATIVE, parse_label
from hpa_nb.sample import writer
from hpa_nb.sample.writer import CELL_SHARE, COLORS, write_sample

REPO = Path(__file__).resolve().parents[1]
ID_PATTERN = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _tfrecord_examples(root: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(file name, features) for every record, in file and record order, parsed with plain TensorFlow."""
    spec = {key: tf.io.FixedLenFeature([], tf.string) for key in ("image", "image_name", "target")}
    examples = []
    for path in sorted((root / "train_tfrecords").glob("*.tfrec")):
        for record in tf.data.TFRecordDataset(str(path)):
            parsed = tf.io.parse_single_example(record, spec)
            examples.append((path.name, {key: value.numpy() for key, value in parsed.items()}))
    return examples


@pytest.fixture(scope="module")
def large_sample(tmp_path_factory) -> Path:
    """200+ tiny images: enough for the every-class guarantee (3 per class)."""
    return write_sample(tmp_path_factory.mktemp("large"), images=220, size=32, seed=5, test_images=2, progress=False)


# --- determinism --------------------------------------------------------------------------
def _all_files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path):
    arguments = dict(images=40, size=64, seed=3, test_images=3, progress=False)
    first = _all_files(write_sample(tmp_path / "a", **arguments))
    second = _all_files(write_sample(tmp_path / "b", **arguments))
    assert list(first) == list(second)
    differing = [name for name in first if first[name] != second[name]]
    assert differing == []
    other = _all_files(write_sample(tmp_path / "c", **{**arguments, "seed": 4}))
    assert other["train.csv"] != first["train.csv"]
    assert set(other) != set(first)  # new IDs, so new PNG names


# --- layout -------------------------------------------------------------------------------
def test_train_csv_ids_match_pngs_and_tfrecords(small_sample):
    rows = _rows(small_sample / "train.csv")
    ids = [row["ID"] for row in rows]
    assert len(ids) == 40 and len(set(ids)) == 40
    assert all(ID_PATTERN.match(image_id) for image_id in ids)
    png_names = sorted(path.name for path in (small_sample / "train").glob("*.png"))
    assert png_names == sorted(f"{image_id}_{color}.png" for image_id in ids for color in COLORS)
    examples = _tfrecord_examples(small_sample)
    names = [features["image_name"].decode() for _, features in examples]
    assert sorted(names) == sorted(name[: -len(".png")] for name in png_names)


def test_tfrecords_hold_each_image_as_four_contiguous_records_in_varying_colour_order(small_sample):
    labels = {row["ID"]: row["Label"] for row in _rows(small_sample / "train.csv")}
    examples = _tfrecord_examples(small_sample)
    files = sorted({name for name, _ in examples})
    assert files == [f"train-{i:03d}-of-{len(files):03d}.tfrec" for i in range(len(files))] and len(files) >= 2
    orders = set()
    for start in range(0, len(examples), 4):
        group = examples[start : start + 4]
        image_ids = {features["image_name"].decode().rsplit("_", 1)[0] for _, features in group}
        assert len(image_ids) == 1, f"records {start}..{start + 3} mix images {image_ids}"
        assert len({file for file, _ in group}) == 1  # one image never spans two files
        (image_id,) = image_ids
        colors = tuple(features["image_name"].decode().rsplit("_", 1)[1] for _, features in group)
        assert sorted(colors) == sorted(COLORS)
        orders.add(colors)
        for _, features in group:
            assert features["target"].decode() == labels[image_id]
            png_path = small_sample / "train" / (features["image_name"].decode() + ".png")
            assert features["image"] == png_path.read_bytes()
    assert len(orders) > 1


def test_tfrecord_pngs_decode_with_tensorflow_like_pil(small_sample):
    _, features = _tfrecord_examples(small_sample)[0]
    decoded = tf.io.decode_png(features["image"], channels=1).numpy()[..., 0]
    expected = _png(small_sample / "train" / (features["image_name"].decode() + ".png"))
    np.testing.assert_array_equal(decoded, expected)


def test_pngs_are_square_greyscale_in_two_sizes_and_submission_sizes_match(large_sample, small_sample):
    sizes = set()
    for row in _rows(large_sample / "train.csv"):
        shapes = {_png(large_sample / "train" / f"{row['ID']}_{color}.png").shape for color in COLORS}
        assert len(shapes) == 1
        (shape,) = shapes
        assert shape[0] == shape[1]
        sizes.add(shape[0])
    assert sizes == {32, 24}
    assert Image.open(next((small_sample / "train").glob("*.png"))).mode == "L"
    submission = _rows(small_sample / "sample_submission.csv")
    assert list(submission[0]) == ["ID", "ImageWidth", "ImageHeight", "PredictionString"]
    assert len(submission) == 4
    test_pngs = sorted(path.name for path in (small_sample / "test").glob("*.png"))
    assert test_pngs == sorted(f"{row['ID']}_{color}.png" for row in submission for color in COLORS)
    for row in submission:
        height, width = _png(small_sample / "test" / f"{row['ID']}_green.png").shape
        assert (int(row["ImageWidth"]), int(row["ImageHeight"])) == (width, height)
        assert row["PredictionString"] == ""


def test_sixteen_bit_output(tmp_path):
    root = write_sample(tmp_path, images=4, size=64, bit_depth=16, test_images=1, progress=False)
    image = Image.open(next((root / "train").glob("*_blue.png")))
    assert image.mode == "I;16"
    values = np.asarray(image)
    assert values.dtype == np.uint16 and values.max() > 255

    _, features = _tfrecord_examples(root)[0]
    assert tf.io.decode_png(features["image"], channels=1, dtype=tf.uint16).numpy().max() > 255


# --- labels -------------------------------------------------------------------------------
@pytest.mark.parametrize("images", [19, 40, 120, 240])
def test_label_draw_guarantees_every_class_and_negative_alone(images):
    label_sets = writer.draw_labels(images, np.random.default_rng(images))
    counts = np.bincount([label for labels in label_sets for label in labels], minlength=N_CLASSES)
    assert counts.min() >= writer.min_class_count(images)
    assert all(1 <= len(labels) <= 3 and len(set(labels)) == len(labels) for labels in label_sets)
    assert all(labels == [NEGATIVE] for labels in label_sets if NEGATIVE in labels)


def test_large_sample_has_every_class_skewed_like_the_real_set(large_sample):
    rows = _rows(large_sample / "train.csv")
    vectors = np.stack([parse_label(row["Label"], row["ID"]) for row in rows])
    counts = vectors.sum(axis=0)
    missing = [LABEL_NAMES[i] for i in np.flatnonzero(counts < 3)]
    assert missing == []
    negative = vectors[:, NEGATIVE] == 1
    assert negative.any() and (vectors[negative].sum(axis=1) == 1).all()
    assert counts[0] > 3 * counts[11] and counts[16] > 3 * counts[15]  # Nucleoplasm, Cytosol common; rare ones rare


def test_progress_bar_goes_to_stderr_for_large_samples(tmp_path, capfd):
    write_sample(tmp_path / "big", images=50, size=32, test_images=0)
    assert "sample" in capfd.readouterr().err
    write_sample(tmp_path / "small", images=49, size=32, test_images=0)
    assert "sample" not in capfd.readouterr().err


# --- masks and cells ----------------------------------------------------------------------
def test_masks_match_images_and_cells_csv_and_cell_labels_union_to_image_label(small_sample):
    cells = defaultdict(dict)
    for row in _rows(small_sample / "cells.csv"):
        cells[row["ID"]][int(row["CellID"])] = row["Label"]
    labels = {row["ID"]: row["Label"] for row in _rows(small_sample / "train.csv")}
    test_ids = [row["ID"] for row in _rows(small_sample / "sample_submission.csv")]
    assert set(cells) == set(labels) | set(test_ids)
    for image_id in list(labels) + test_ids:
        folder = "train" if image_id in labels else "test"
        mask_image = Image.open(small_sample / "masks" / f"{image_id}.png")
        assert mask_image.mode == "I;16"
        mask = np.asarray(mask_image)
        assert mask.shape == _png(small_sample / folder / f"{image_id}_red.png").shape
        assert set(np.unique(mask)) - {0} == set(cells[image_id])
        for cell in cells[image_id]:
            assert ndimage.label(mask == cell)[1] == 1, f"{image_id} cell {cell} is in pieces"
        cell_sets = [{int(c) for c in text.split("|")} for text in cells[image_id].values()]
        assert all(NEGATIVE not in found or found == {NEGATIVE} for found in cell_sets)  # Negative cells only alone
        if image_id in labels:
            image_label = {int(c) for c in labels[image_id].split("|")}
            if image_label == {NEGATIVE}:
                assert cell_sets == [{NEGATIVE}] * len(cell_sets)
            else:  # the image label is the union of the cells' localisation labels
                assert set().union(*cell_sets) - {NEGATIVE} == image_label


def test_a_label_is_carried_by_some_cells_only_and_rare_cell_cycle_classes_by_the_fewest(default_sample):
    cells = defaultdict(list)
    for row in _rows(default_sample / "cells.csv"):
        cells[row["ID"]].append({int(c) for c in row["Label"].split("|")})
    share = defaultdict(list)  # class -> share of its images' cells that carry it
    negative_cells_in_labelled_images = 0
    for cell_sets in cells.values():
        for label in set().union(*cell_sets) - {NEGATIVE}:
            share[label].append(np.mean([label in found for found in cell_sets]))
        if {NEGATIVE} in cell_sets and any(found != {NEGATIVE} for found in cell_sets):
            negative_cells_in_labelled_images += 1
    every_share = [s for shares in share.values() for s in shares]
    assert np.mean([s < 1 for s in every_share]) > 0.5  # most labels miss some of their image's cells
    assert negative_cells_in_labelled_images > 20  # images with stained and unstained cells side by side
    spindle, nucleoplasm = np.mean(share[11]), np.mean(share[0])
    assert spindle < 0.35 < 0.7 < nucleoplasm
    assert CELL_SHARE[11] == CELL_SHARE[:NEGATIVE].min()


def test_cells_have_nuclei_in_the_blue_channel(small_sample):
    image_id = _rows(small_sample / "train.csv")[0]["ID"]
    mask = np.asarray(Image.open(small_sample / "masks" / f"{image_id}.png"))
    blue = _png(small_sample / "train" / f"{image_id}_blue.png").astype(float)
    assert blue[mask > 0].mean() > 2 * blue[mask == 0].mean()
    for cell in np.unique(mask[mask > 0]):
        assert blue[mask == cell].max() > 3 * np.median(blue[mask == 0])


# --- the green channel follows the labels --------------------------------------------------
def _green_with(label: int, seed: int = 0, size: int = 96) -> tuple[np.ndarray, writer.Geometry]:
    rng = np.random.default_rng(seed)
    geometry = writer.make_geometry(size, rng)
    channels, _ = writer.render_image(size, [[label]] * geometry.cells, rng, geometry)
    return channels["green"], geometry


NUCLEAR = [0, 2, 4, 5]  # Nucleoplasm, Nucleoli, Nuclear speckles, Nuclear bodies
CYTOPLASMIC = [6, 8, 14, 16, 17]  # ER, Intermediate filaments, Mitochondria, Cytosol, Vesicles


@pytest.mark.parametrize("label", NUCLEAR + CYTOPLASMIC)
def test_green_signal_sits_in_the_compartment_of_its_class(label):
    green, g = _green_with(label)
    inside_nucleus, in_cytoplasm = green[g.nucleus].mean(), green[g.cytoplasm].mean()
    if label in NUCLEAR:
        assert inside_nucleus > 1.5 * in_cytoplasm, LABEL_NAMES[label]
    else:
        assert in_cytoplasm > 1.5 * inside_nucleus, LABEL_NAMES[label]


def test_plasma_membrane_lights_cell_borders_and_negative_shows_only_background():
    green, g = _green_with(13)
    assert green[g.boundary].mean() > 3 * green[g.nucleus].mean()
    negative, g = _green_with(NEGATIVE)
    background = negative[~g.inside]
    assert abs(negative[g.inside].mean() - background.mean()) < 0.01 and negative.max() < 0.1


def test_every_class_has_its_own_green_pattern():
    """Same cells, one class at a time: each green image differs clearly (somewhere) from every other class's."""
    greens = np.stack([_green_with(label)[0].ravel() for label in range(N_CLASSES)])
    for label in range(N_CLASSES):
        others = np.delete(np.arange(N_CLASSES), label)
        # a high percentile, not the mean: small patterns (centrosome, nucleoli) cover few pixels
        closest = np.percentile(np.abs(greens[others] - greens[label]), 99.9, axis=1).min()
        assert closest > 0.15, f"{LABEL_NAMES[label]} looks like another class"


def test_written_green_follows_labels_nucleoplasm_vs_cytosol(large_sample):
    """In the written files, nucleoplasm images are bright in nuclei and cytosol images in the cytoplasm."""
    ratios = defaultdict(list)
    for row in _rows(large_sample / "train.csv"):
        label = row["Label"]
        if label not in ("0", "16", str(NEGATIVE)):
            continue
        mask = np.asarray(Image.open(large_sample / "masks" / f"{row['ID']}.png"))
        blue = _png(large_sample / "train" / f"{row['ID']}_blue.png").astype(float)
        green = _png(large_sample / "train" / f"{row['ID']}_green.png").astype(float)
        nucleus = (mask > 0) & (blue > np.percentile(blue[mask > 0], 70))
        cytoplasm = (mask > 0) & (blue < np.percentile(blue[mask > 0], 30))
        ratios[label].append(green[nucleus].mean() / max(green[cytoplasm].mean(), 1.0))
    assert ratios["0"] and ratios["16"] and ratios[str(NEGATIVE)]
    assert np.median(ratios["0"]) > 1.3 and np.median(ratios["16"]) < 1 / 1.3


# --- arguments and the output folder --------------------------------------------------------
@pytest.mark.parametrize("arguments", [dict(images=0), dict(size=16), dict(bit_depth=12), dict(test_images=-1)])
def test_bad_arguments_raise_value_error(tmp_path, arguments):
    with pytest.raises(ValueError):
        write_sample(tmp_path, **{"images": 4, "size": 64, "progress": False, **arguments})


def test_overwrites_a_previous_sample_but_never_a_foreign_folder(tmp_path):
    write_sample(tmp_path / "s", images=8, size=32, test_images=0, progress=False)
    write_sample(tmp_path / "s", images=4, size=32, test_images=0, progress=False)
    assert len(list((tmp_path / "s" / "train").glob("*.png"))) == 16  # no stale files from the first run
    assert len(list((tmp_path / "s" / "masks").glob("*.png"))) == 4
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine"):
        write_sample(foreign, images=4, size=32, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"


# --- command line -----------------------------------------------------------------------------
def _cli(*arguments: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "hpa_nb", "sample", *arguments],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )


@pytest.mark.slow  # a whole sample through the command; the writer's own tests stay quick
def test_cli_writes_a_sample(tmp_path):
    result = _cli("--out", str(tmp_path / "cli"), "--images", "8", "--size", "48", "--test-images", "2")
    assert result.returncode == 0, result.stderr
    assert len(_rows(tmp_path / "cli" / "train.csv")) == 8
    assert len(_rows(tmp_path / "cli" / "sample_submission.csv")) == 2
    assert {_png(path).shape[0] for path in (tmp_path / "cli" / "train").glob("*.png")} <= {48, 32}


@pytest.mark.parametrize("arguments", [("--bit-depth", "12"), ("--images", "0")])
def test_cli_rejects_bad_arguments_with_status_2(tmp_path, arguments, cli):
    result = cli("sample", "--out", tmp_path / "bad", *arguments)
    assert result.status == 2 and "Traceback" not in result.err
    assert arguments[0].lstrip("-").replace("-", "_") in result.err.replace("-", "_")
