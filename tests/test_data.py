"""hpa_nb.data.pipeline: every image exactly once, with its own channels and label, from every layout; bad input named."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import kill_when_written
from PIL import Image

from hpa_nb import cli
from hpa_nb.core.files import temporary_path
from hpa_nb.core.labels import N_CLASSES, label_matrix, parse_label
from hpa_nb.data import bad_input, competition, pipeline, shards, splits
from hpa_nb.data.competition import encode_record, write_tfrecord
from hpa_nb.data.pipeline import Stream

REPO = Path(__file__).resolve().parents[1]
COLORS = ("red", "green", "blue", "yellow")
IMAGE_SIZE = 16
SIZES = (20, 24, 32)  # mixed sizes in one data set, all resized to IMAGE_SIZE


def planted(index: int, channel: int) -> int:
    """A value unique to (image, channel), so a channel from the wrong image is caught."""
    return 1 + 4 * index + channel


def image_id(index: int) -> str:
    return f"{index:04d}abcd-ef01-11e8-b2b9-ac1f6b6435d{index % 10}"


def label_text(index: int) -> str:
    return f"{index % N_CLASSES}|{(index * 7 + 3) % N_CLASSES}"


def png_bytes(value: int, size: int, bit_depth: int) -> bytes:
    array = np.full((size, size), value, np.uint8) if bit_depth == 8 else np.full((size, size), value * 257, np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_dataset(
    root: Path,
    count: int = 12,
    bit_depth: int = 8,
    files: int = 3,
    pngs: bool = True,
    tfrecords: bool = True,
    seed: int = 0,
) -> Path:
    """A competition-layout data set whose channels carry planted values; colour order varies per image."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    if pngs:
        (root / "train").mkdir(exist_ok=True)
    rows = ["ID,Label"]
    per_file: list[list[bytes]] = [[] for _ in range(files)]
    for index in range(count):
        size = SIZES[index % len(SIZES)]
        rows.append(f"{image_id(index)},{label_text(index)}")
        colors = list(COLORS)
        rng.shuffle(colors)
        for color in colors:
            png = png_bytes(planted(index, COLORS.index(color)), size, bit_depth)
            if pngs:
                (root / "train" / f"{image_id(index)}_{color}.png").write_bytes(png)
            per_file[index % files].append(encode_record(f"{image_id(index)}_{color}", png, label_text(index)))
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    if tfrecords:
        (root / "train_tfrecords").mkdir(exist_ok=True)
        for number, records in enumerate(per_file):
            write_tfrecord(root / "train_tfrecords" / f"{number:02d}-{len(records)}.tfrec", records)
    return root


def collect(dataset) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """ID → (image, label); fails on an ID seen twice."""
    seen = {}
    for image, label, image_id_bytes in dataset.as_numpy_iterator():
        key = image_id_bytes.decode()
        assert key not in seen, f"{key} came out twice"
        seen[key] = (image, label)
    return seen


def assert_all_planted(seen: dict, count: int, channels: int) -> None:
    assert sorted(seen) == sorted(image_id(i) for i in range(count))
    for index in range(count):
        image, label = seen[image_id(index)]
        assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, channels) and image.dtype == np.float32
        expected = np.array([planted(index, c) for c in range(channels)], np.float32)
        np.testing.assert_allclose(image.min(axis=(0, 1)), expected, atol=0.01)
        np.testing.assert_allclose(image.max(axis=(0, 1)), expected, atol=0.01)
        np.testing.assert_array_equal(label, parse_label(label_text(index)))


@pytest.fixture(scope="module")
def planted8(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("planted8"), count=12, bit_depth=8)


@pytest.fixture(scope="module")
def planted16(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("planted16"), count=6, bit_depth=16, files=2)


# --- every image once, its own channels and label --------------------------------------------
@pytest.mark.parametrize("channels, deterministic", [("rgb", True), ("rgby", False)])
def test_tfrecords_yield_every_image_once_with_its_own_channels(planted8, channels, deterministic):
    dataset = pipeline.read_tfrecords(
        planted8 / "train_tfrecords", IMAGE_SIZE, channels, with_id=True, deterministic=deterministic
    )
    assert_all_planted(collect(dataset), 12, len(channels))


def test_tfrecords_deterministic_order_repeats(planted8):
    first = [
        i
        for _, _, i in pipeline.read_tfrecords(
            planted8 / "train_tfrecords", IMAGE_SIZE, with_id=True
        ).as_numpy_iterator()
    ]
    again = [
        i
        for _, _, i in pipeline.read_tfrecords(
            planted8 / "train_tfrecords", IMAGE_SIZE, with_id=True
        ).as_numpy_iterator()
    ]
    assert first == again and len(first) == 12


def test_png_dir_yields_every_image_once_in_csv_order(planted8):
    dataset = pipeline.read_png_dir(planted8, IMAGE_SIZE, "rgby", with_id=True)
    order = [i.decode() for _, _, i in dataset.as_numpy_iterator()]
    assert order == [image_id(i) for i in range(12)]
    assert_all_planted(collect(dataset), 12, 4)


@pytest.mark.parametrize("reader", ["tfrecords", "png"])
def test_16_bit_pngs_come_out_on_the_0_255_scale(planted16, reader):
    dataset = (
        pipeline.read_tfrecords(planted16 / "train_tfrecords", IMAGE_SIZE, "rgby", with_id=True)
        if reader == "tfrecords"
        else pipeline.read_png_dir(planted16, IMAGE_SIZE, "rgby", with_id=True)
    )
    assert_all_planted(collect(dataset), 6, 4)


def test_16_bit_values_between_8_bit_steps_are_divided_by_257(tmp_path):
    root = write_dataset(tmp_path, count=1, tfrecords=False)
    for color in COLORS:  # all channels 8 px: an image's channels must share one size
        Image.fromarray(np.full((8, 8), 100, np.uint8)).save(root / "train" / f"{image_id(0)}_{color}.png")
    array = np.full((8, 8), 1000, np.uint16)
    array[0, 0] = 65535
    Image.fromarray(array).save(root / "train" / f"{image_id(0)}_green.png")
    image, _ = next(iter(pipeline.read_png_dir(root, 8, "rgb")))
    assert image.numpy()[0, 0, 1] == pytest.approx(255.0)
    assert image.numpy()[4, 4, 1] == pytest.approx(1000 / 257, abs=1e-3)


def test_labels_without_images_of_other_ids_are_ignored_by_the_id_filter(planted8):
    wanted = [image_id(i) for i in (1, 5, 7)]
    for dataset in (
        pipeline.read_tfrecords(planted8 / "train_tfrecords", IMAGE_SIZE, with_id=True, ids=wanted),
        pipeline.read_png_dir(planted8, IMAGE_SIZE, with_id=True, ids=wanted),
        pipeline.open_dataset(planted8, IMAGE_SIZE, with_id=True, ids=wanted),
    ):
        assert sorted(collect(dataset)) == sorted(wanted)


def test_open_dataset_prefers_shards_then_tfrecords_then_pngs(tmp_path, capsys, monkeypatch):
    root = write_dataset(tmp_path / "d", count=4, files=2)
    assert len(collect(pipeline.open_dataset(root, IMAGE_SIZE, with_id=True))) == 4
    assert "competition TFRecords" in capsys.readouterr().err
    shards.write_shards(root, size=IMAGE_SIZE, channels="rgby", progress=False)
    capsys.readouterr()
    reads = []
    monkeypatch.setattr(
        pipeline, "read_manifest", lambda folder, real=shards.read_manifest: reads.append(folder) or real(folder)
    )
    seen = collect(pipeline.open_dataset(root, IMAGE_SIZE, "rgby", with_id=True))
    assert "compact shards" in capsys.readouterr().err and len(reads) == 1  # the manifest is read once
    assert_all_planted(seen, 4, 4)
    png_only = write_dataset(tmp_path / "p", count=4, tfrecords=False)
    assert len(collect(pipeline.open_dataset(png_only, IMAGE_SIZE, with_id=True))) == 4
    assert "PNG folder" in capsys.readouterr().err


# --- bad input: named, or skipped and counted ---------------------------------------------------
def read_all(dataset) -> list:
    return list(dataset.as_numpy_iterator())


def error_of(dataset) -> str:
    with pytest.raises((tf.errors.InvalidArgumentError, tf.errors.DataLossError)) as caught:
        read_all(dataset)
    return bad_input.error_message(caught.value)


def rewrite_records(path: Path, change) -> None:
    """Rewrite a TFRecord file with `change(list of (name, png, target))` applied."""
    parsed = []
    for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
        example = tf.train.Example.FromString(raw)
        values = {key: example.features.feature[key].bytes_list.value[0] for key in ("image_name", "image", "target")}
        parsed.append([values["image_name"].decode(), values["image"], values["target"].decode()])
    parsed = change(parsed)
    write_tfrecord(path, [encode_record(name, png, target) for name, png, target in parsed])


def first_file(root: Path) -> Path:
    return sorted((root / "train_tfrecords").glob("*.tfrec"))[0]


def corrupt_png(png: bytes) -> bytes:
    damaged = bytearray(png)
    damaged[len(damaged) // 2 :] = b"\x00" * (len(damaged) - len(damaged) // 2)
    return bytes(damaged)


def set_field(index: int, field: int, value):
    def change(rows):
        rows[index][field] = value(rows[index][field]) if callable(value) else value
        return rows

    return change


BAD_RECORDS = {
    "corrupt png": (set_field(1, 1, corrupt_png), "does not decode"),
    "unknown colour": (
        set_field(2, 0, lambda name: name.rsplit("_", 1)[0] + "_purple"),
        "unknown colour suffix 'purple'",
    ),
    "repeated colour": (
        set_field(0, 0, lambda name: name.rsplit("_", 1)[0] + "_" + ("red" if not name.endswith("_red") else "green")),
        "need red, green, blue, yellow once each",
    ),
    "label out of range": (
        lambda rows: [[n, p, "3|19" if i < 4 else t] for i, (n, p, t) in enumerate(rows)],
        "'3|19' is not in 0..18",
    ),
    "missing record": (lambda rows: rows[1:], "a record is missing"),
    "missing last record": (lambda rows: rows[:-1], "expected 4: a record is missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_tfrecords_raise_naming_file_and_id(tmp_path, case):
    change, expected = BAD_RECORDS[case]
    root = write_dataset(tmp_path, count=6, files=2, pngs=False)
    bad_file = first_file(root)
    rewrite_records(bad_file, change)
    message = error_of(pipeline.read_tfrecords(root / "train_tfrecords", IMAGE_SIZE, "rgby", deterministic=False))
    assert expected in message
    assert any(image_id(i) in message for i in (0, 2, 4))
    assert str(bad_file) in message
    assert "node" not in message and "\n" not in message


COLOR_RANK = {color: rank for rank, color in enumerate(COLORS)}
RECORD_ORDERS = {  # how a file's records (name, png, target) may be laid out; write_dataset writes them by image
    "per image": lambda rows: rows,
    "colour-major": lambda rows: sorted(rows, key=lambda row: COLOR_RANK[row[0].rsplit("_", 1)[1]]),
    "random": lambda rows: random.Random(7).sample(rows, len(rows)),
    "reversed": lambda rows: rows[::-1],
}


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "free"])
@pytest.mark.parametrize("order", sorted(RECORD_ORDERS))
def test_any_record_order_gives_every_image_exactly_its_own_channels(tmp_path, order, deterministic):
    root = write_dataset(tmp_path, count=9, files=3, pngs=False)
    for path in sorted((root / "train_tfrecords").glob("*.tfrec")):
        rewrite_records(path, RECORD_ORDERS[order])
    dataset = pipeline.read_tfrecords(
        root / "train_tfrecords", IMAGE_SIZE, "rgby", with_id=True, deterministic=deterministic
    )
    assert_all_planted(collect(dataset), 9, 4)


def test_an_image_split_over_two_files_is_read_whole_and_one_missing_a_record_is_named(tmp_path):
    root = write_dataset(tmp_path, count=6, files=2, pngs=False)
    first, second = sorted((root / "train_tfrecords").glob("*.tfrec"))
    moved = []

    def take_two(rows):  # image 0's first two records leave the first file ...
        moved.extend(rows[:2])
        return rows[2:]

    rewrite_records(first, take_two)
    rewrite_records(second, lambda rows: rows[:5] + moved + rows[5:])  # ... for the middle of the second
    seen = collect(pipeline.read_tfrecords(root / "train_tfrecords", IMAGE_SIZE, "rgby", with_id=True))
    assert_all_planted(seen, 6, 4)

    rewrite_records(second, lambda rows: [row for row in rows if row[0] != moved[0][0]])  # one of them is lost
    message = error_of(pipeline.read_tfrecords(root / "train_tfrecords", IMAGE_SIZE, "rgby"))
    assert image_id(0) in message and "only 3 records, expected 4" in message
    assert str(first) in message and str(second) in message  # both files that hold its other records


def test_truncated_tfrecord_raises_naming_the_file(tmp_path):
    root = write_dataset(tmp_path, count=6, files=2, pngs=False)
    bad_file = first_file(root)
    contents = bad_file.read_bytes()
    bad_file.write_bytes(contents[: len(contents) - 100])
    message = error_of(pipeline.read_tfrecords(root / "train_tfrecords", IMAGE_SIZE))
    assert str(bad_file) in message and "truncated" in message


def test_skip_bad_skips_only_the_bad_images_and_counts_them(tmp_path, capsys):
    root = write_dataset(tmp_path, count=6, files=2, pngs=False)
    rewrite_records(first_file(root), set_field(1, 1, corrupt_png))  # image 0 of file 0
    log = bad_input.SkipLog()
    seen = collect(pipeline.read_tfrecords(root / "train_tfrecords", IMAGE_SIZE, "rgby", with_id=True, skip_bad=log))
    assert log.count == 1 and image_id(0) in log.problems[0]
    assert sorted(seen) == sorted(image_id(i) for i in range(1, 6))
    assert "warning: skipped" in capsys.readouterr().err


def test_png_dir_bad_input_is_named(tmp_path):
    root = write_dataset(tmp_path, count=4, tfrecords=False)
    (root / "train" / f"{image_id(1)}_blue.png").unlink()
    with pytest.raises(FileNotFoundError, match=f"{image_id(1)}_blue.png"):
        pipeline.read_png_dir(root, IMAGE_SIZE)
    log = bad_input.SkipLog(echo=False)
    assert len(read_all(pipeline.read_png_dir(root, IMAGE_SIZE, skip_bad=log))) == 3 and log.count == 1

    with (root / "train.csv").open("a") as stream:
        stream.write("deadbeef-no-images,1\n")
    with pytest.raises(FileNotFoundError, match="deadbeef-no-images.*no images"):
        pipeline.read_png_dir(root, IMAGE_SIZE, ids=["deadbeef-no-images"])

    (root / "train" / f"{image_id(2)}_purple.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="purple"):
        pipeline.read_png_dir(root, IMAGE_SIZE, ids=[image_id(2)])

    (root / "train" / f"{image_id(3)}_red.png").write_bytes(
        corrupt_png((root / "train" / f"{image_id(3)}_red.png").read_bytes())
    )
    message = error_of(pipeline.read_png_dir(root, IMAGE_SIZE, ids=[image_id(3)]))
    assert image_id(3) in message and "does not decode" in message


# --- a PNG that does not decode, or channels of unequal sizes: the one bad channel named -------
def test_corrupt_png_in_png_dir_names_that_file_and_no_other(tmp_path):
    root = write_dataset(tmp_path, count=4, tfrecords=False)
    (root / "train" / f"{image_id(1)}_green.png").write_bytes(b"garbage")
    message = error_of(pipeline.read_png_dir(root, IMAGE_SIZE, "rgby"))
    assert (
        message == f"file {root / 'train' / image_id(1)}_green.png: image {image_id(1)}: the green PNG does not decode"
    )
    log = bad_input.SkipLog(echo=False)
    assert len(read_all(pipeline.read_png_dir(root, IMAGE_SIZE, "rgby", skip_bad=log))) == 3
    assert log.problems == [message]


def test_png_dir_channels_of_unequal_sizes_name_the_odd_file_and_the_sizes(tmp_path):
    root = write_dataset(tmp_path, count=2, tfrecords=False)  # image 1 is 24 px
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(root / "train" / f"{image_id(1)}_blue.png")
    message = error_of(pipeline.read_png_dir(root, IMAGE_SIZE, "rgb"))
    assert message == (
        f"file {root / 'train' / image_id(1)}_blue.png: image {image_id(1)}: "
        "channels of unequal sizes (red 24x24, green 24x24, blue 12x10)"
    )


def change_png(index: int, color: str, change) -> Callable:
    """A `rewrite_records` change applied to the record of image `index`, colour `color`."""

    def apply(rows):
        for row in rows:
            if row[0] == f"{image_id(index)}_{color}":
                row[1] = change(row[1])
        return rows

    return apply


def test_corrupt_png_in_a_tfrecord_names_the_file_the_image_and_the_colour(tmp_path):
    root = write_dataset(tmp_path, count=6, files=2, pngs=False)
    bad_file = first_file(root)  # images 0, 2, 4
    rewrite_records(bad_file, change_png(2, "green", corrupt_png))
    for channels in ("rgb", "rgby"):
        message = error_of(pipeline.read_tfrecords(root / "train_tfrecords", IMAGE_SIZE, channels, deterministic=False))
        assert message == (
            f"file {bad_file}: image {image_id(2)}: only 3 records, expected 4: "
            "a record is missing or its PNG does not decode (green)"
        )
    rewrite_records(bad_file, change_png(4, "red", lambda png: png_bytes(1, 8, 8)))  # image 4 is 24 px
    message = error_of(pipeline.read_tfrecords(root / "train_tfrecords", IMAGE_SIZE, "rgb", ids=[image_id(4)]))
    assert message == (
        f"file {bad_file}: image {image_id(4)}: channels of unequal sizes (red 8x8, green 24x24, blue 24x24)"
    )


TF_ASSERT = "[file a.tfrec: image X: the green PNG doesn\\'t decode]"
TF_MESSAGES = {
    "eager": f"{{{{function_node __wrapped__IteratorGetNext}}}} assertion failed: {TF_ASSERT}\n\t "
    "[[{{node Assert/Assert}}]] [Op:IteratorGetNext] name: ",
    "keras fit": "Graph execution error:\n\nDetected at node Assert/Assert defined at (most recent call last):\n"
    "<stack traces unavailable>\nError in user-defined function passed to MapDataset:18 transformation "
    f"with iterator: Iterator::Root::Prefetch::ParallelMapV2: assertion failed: {TF_ASSERT}\n\t "
    "[[{{node Assert/Assert}}]]\n\t [[IteratorGetNext]] [Op:__inference_multi_step_on_iterator_8962]",
    "graph node": f"assertion failed: {TF_ASSERT}\n\t [[node IteratorGetNext (defined at train.py:12) ]]",
    "nested nodes": f"assertion failed: {TF_ASSERT}\n\t [[{{{{node IteratorGetNext}}}}]]\n\t [[IteratorGetNext]]",
}


@pytest.mark.parametrize("shape", sorted(TF_MESSAGES))
def test_error_message_strips_tensorflow_noise_of_every_shape(shape):
    error = tf.errors.InvalidArgumentError(None, None, TF_MESSAGES[shape])
    assert bad_input.error_message(error) == "file a.tfrec: image X: the green PNG doesn't decode"


# --- bad input through the command line: one line, exit status 2 -------------------------------
@pytest.mark.parametrize("verb", ["shard", "train"])
def test_cli_names_the_corrupt_png_of_a_png_folder(tmp_path, verb, cli):
    root = write_dataset(tmp_path / "d", count=12, tfrecords=False)
    bad = root / "train" / f"{image_id(5)}_green.png"
    bad.write_bytes(b"garbage")
    arguments = (
        ["shard", "--src", str(root), "--out", str(tmp_path / "shards")]
        if verb == "shard"
        else ["train", "--quick", "--data", str(root), "--epochs", "1", "--out", str(tmp_path / "run")]
    )
    cli(*arguments).assert_one_error_line(f"file {bad}: image {image_id(5)}: the green PNG does not decode")


def test_cli_names_the_tfrecord_and_colour_of_a_corrupt_png(tmp_path, cli):
    root = write_dataset(tmp_path / "d", count=6, files=2, pngs=False)
    bad_file = first_file(root)
    rewrite_records(bad_file, change_png(2, "blue", corrupt_png))
    result = cli("shard", "--src", root, "--out", tmp_path / "shards")
    result.assert_one_error_line(
        f"file {bad_file}: image {image_id(2)}: only 3 records, expected 4: "
        "a record is missing or its PNG does not decode (blue)"
    )


def test_bad_label_in_csv_names_the_id(tmp_path):
    root = write_dataset(tmp_path, count=3, tfrecords=False)
    text = (root / "train.csv").read_text().replace(f"{image_id(1)},{label_text(1)}", f"{image_id(1)},4|25")
    (root / "train.csv").write_text(text)
    with pytest.raises(ValueError, match=f"{image_id(1)}.*25"):
        competition.load_labels(root)
    assert list(competition.load_labels(root, skip_bad=bad_input.SkipLog(echo=False))["ID"]) == [
        image_id(0),
        image_id(2),
    ]


# --- shards ------------------------------------------------------------------------------
@pytest.mark.slow
def test_shards_resume_after_a_killed_run_with_every_id_once(default_sample, tmp_path):
    """A real `shard` process SIGKILLed after its second shard, as a lost Kaggle session would be; a new process
    goes on from the finished shards and every image ends up in exactly one."""
    out = tmp_path / "shards"
    command = [
        sys.executable,
        "-m",
        "hpa_nb",
        "shard",
        "--src",
        str(default_sample),
        "--out",
        str(out),
        "--size",
        "32",
        "--channels",
        "rgb",
        "--images-per-shard",
        "20",
    ]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    kill_when_written(command, out / "shard-00001.tfrec", environment)
    assert not (out / shards.MANIFEST).exists()
    kept = {path.name: path.read_bytes() for path in out.glob(shards.SHARD_GLOB)}
    assert 2 <= len(kept) < 12
    # what a kill may also leave: a half-written temporary shard, and the listing of a shard that never arrived
    temporary_path(out / f"shard-{len(kept):05d}.tfrec").write_bytes(b"half a shard")
    (out / "shard-00099.tfrec.json").write_text('{"ids": ["never written"]}')

    resumed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"already in {len(kept)} shards" in resumed.stderr
    manifest = shards.read_manifest(out)
    train_ids = pd.read_csv(default_sample / "train.csv")["ID"].tolist()
    listed = [image_id for entry in manifest["shards"] for image_id in entry["ids"]]
    assert sorted(listed) == sorted(train_ids) and manifest["complete"]  # every image once
    assert [entry["count"] for entry in manifest["shards"]] == [20] * 12
    assert all((out / name).read_bytes() == content for name, content in kept.items())  # finished shards untouched
    assert not list(out.glob(".tmp-*")) and not (out / "shard-00099.tfrec.json").exists()
    again = shards.write_shards(default_sample, out, size=32, channels="rgb", images_per_shard=20, progress=False)
    assert again["shards"] == manifest["shards"]
    with pytest.raises(ValueError, match="already holds files"):
        shards.write_shards(default_sample, out, size=64, channels="rgb", images_per_shard=20, progress=False)


def test_shards_left_without_a_manifest_are_not_read_as_shards(tmp_path):
    """A shard folder whose run never finished (no manifest) is not a layout: the PNGs are read instead."""
    root = write_dataset(tmp_path / "d", count=4, tfrecords=False)
    (root / "shards").mkdir()
    (root / "shards" / "shard-00000.tfrec").write_bytes(b"not a shard")
    assert_all_planted(collect(pipeline.open_dataset(root, IMAGE_SIZE, with_id=True)), 4, 3)


def test_shards_from_tfrecords_and_png_encoding_keep_every_image(tmp_path):
    root = write_dataset(tmp_path, count=5, files=2, pngs=False)
    manifest = shards.write_shards(root, size=IMAGE_SIZE, channels="rgby", encoding="png", progress=False)
    assert manifest["encoding"] == "png" and manifest["count"] == 5
    assert_all_planted(collect(pipeline.open_dataset(root, IMAGE_SIZE, "rgby", with_id=True)), 5, 4)
    assert_all_planted(collect(pipeline.open_dataset(root, IMAGE_SIZE, "rgb", with_id=True)), 5, 3)


def test_shard_cli_names_bad_input_in_one_line_or_skips_it(tmp_path, capsys):
    root = write_dataset(tmp_path, count=4, files=2, pngs=False)
    rewrite_records(first_file(root), set_field(2, 0, lambda name: name.rsplit("_", 1)[0] + "_purple"))
    assert cli.main(["shard", "--src", str(root), "--out", str(tmp_path / "s"), "--size", "16"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # the rest is the progress bar
    assert len(errors) == 1 and "purple" in errors[0] and image_id(0) in errors[0] and "Traceback" not in err
    assert cli.main(["shard", "--src", str(root), "--out", str(tmp_path / "s"), "--size", "16", "--skip-bad"]) == 0
    assert "skipped 1" in capsys.readouterr().err
    assert json.loads((tmp_path / "s" / shards.MANIFEST).read_text())["count"] == 3


def test_shards_of_an_older_writer_are_refused_in_one_line(tmp_path):
    root = write_dataset(tmp_path / "d", count=3, tfrecords=False)
    out = tmp_path / "s"
    shards.write_shards(root, out, size=IMAGE_SIZE, channels="rgb", progress=False)
    sidecar = out / "shard-00000.tfrec.json"
    sidecar.write_text(
        json.dumps(
            {key: value for key, value in json.loads(sidecar.read_text()).items() if key not in ("labels", "bytes")}
        )
    )  # as the writer before manifest version 2
    with pytest.raises(ValueError, match="written by an older hpa-nb .*use another --out"):
        shards.write_shards(root, out, size=IMAGE_SIZE, channels="rgb", progress=False)


def test_shards_stop_as_soon_as_the_projected_total_is_over_budget(tmp_path):
    root = write_dataset(tmp_path / "d", count=10, tfrecords=False)
    out = tmp_path / "s"
    with pytest.raises(
        shards.ShardBudgetError,
        match=r"shards of .*: .* kB per image, so the 10 images would need .* GB, over the 1e-06 GB",
    ):
        shards.write_shards(root, out, size=IMAGE_SIZE, channels="rgb", images_per_shard=3, progress=False, max_gb=1e-6)
    # the first shard, finished before the check, is kept for a rerun; nothing else is left
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.tfrec", "shard-00000.tfrec.json"]
    manifest = shards.write_shards(
        root, out, size=IMAGE_SIZE, channels="rgb", images_per_shard=3, progress=False, max_gb=1.0
    )
    assert manifest["complete"] and manifest["count"] == 10
    assert manifest["bytes"] == sum((out / entry["file"]).stat().st_size for entry in manifest["shards"])
    assert manifest["bytes_per_image"] == round(manifest["bytes"] / 10)


def test_shards_stopped_at_a_deadline_are_adopted_by_the_next_session(tmp_path):
    root = write_dataset(tmp_path / "d", count=10, tfrecords=False)
    first = tmp_path / "session1" / "shards"
    stopped = shards.write_shards(
        root, first, size=IMAGE_SIZE, channels="rgb", images_per_shard=3, progress=False, deadline=time.time() - 1
    )  # already past: stop after the first shard
    assert (stopped["complete"], stopped["count"]) == (False, 3)
    with pytest.raises(ValueError, match="incomplete"):
        shards.pair(first, stopped, competition.load_labels(root), root)
    second = tmp_path / "session2" / "shards"  # the next session starts with an empty working folder
    assert shards.adopt_shards(first, second) == 1
    assert (second / "shard-00000.tfrec").read_bytes() == (first / "shard-00000.tfrec").read_bytes()
    finished = shards.write_shards(root, second, size=IMAGE_SIZE, channels="rgb", images_per_shard=3, progress=False)
    assert (finished["complete"], finished["count"]) == (True, 10)
    assert finished["shards"][0] == stopped["shards"][0]
    assert_all_planted(collect(pipeline.open_dataset(root, IMAGE_SIZE, with_id=True, shards=second)), 10, 3)


def test_shards_from_elsewhere_pair_with_train_csv_or_say_why_not(tmp_path, capsys):
    root = write_dataset(tmp_path / "d", count=6, tfrecords=False)
    out = tmp_path / "elsewhere"
    manifest = shards.write_shards(root, out, size=IMAGE_SIZE, channels="rgb", progress=False)
    frame = competition.load_labels(root)
    assert shards.pair(out, manifest, frame, root).equals(frame)
    relabelled = frame.copy()
    relabelled.loc[2, "Label"] = "18" if frame.loc[2, "Label"] != "18" else "17"
    with pytest.raises(ValueError, match=f"image {image_id(2)} has label .* in the shards but '1[78]'"):
        shards.pair(out, manifest, relabelled, root)
    with pytest.raises(ValueError, match="hold 1 images that .* lacks"):
        shards.pair(out, manifest, frame.drop(index=0), root)
    more = pd.concat([frame, pd.DataFrame({"ID": ["not-sharded"], "Label": ["0"]})], ignore_index=True)
    with pytest.raises(ValueError, match="1 of the 7 images .* are not in the shards .*not-sharded"):
        shards.pair(out, manifest, more, root)
    # an image skipped as bad when the shards were written is left out, with a warning
    assert shards.pair(out, {**manifest, "skipped": 1}, more, root).equals(frame)
    assert "skipped as bad" in capsys.readouterr().err
    with pytest.raises(ValueError, match="hold rgb, not rgby"):
        pipeline.open_dataset(root, IMAGE_SIZE, "rgby", shards=out)


# --- split ----------------------------------------------------------------------------------
def test_split_is_deterministic_and_stratified():
    rng = np.random.default_rng(3)
    count = 300
    matrix = np.zeros((count, N_CLASSES), np.float32)
    matrix[np.arange(count), rng.integers(0, 5, count)] = 1  # common classes
    matrix[rng.random((count, N_CLASSES)) < 0.05] = 1
    for rare, members in zip(
        range(10, 19), ([0, 1], [2, 3, 4], [5, 6], [7, 8], [9, 10], [11, 12, 13], [14, 15], [16, 17], [18, 19])
    ):
        matrix[:, rare] = 0
        matrix[members, rare] = 1
    matrix[20, 9] = 1  # a class with one image
    ids = [f"id{i}" for i in range(count)]
    train, val = splits.split(ids, matrix, 0.2, seed=7)
    assert (train, val) == splits.split(ids, matrix, 0.2, seed=7)
    assert splits.split(ids, matrix, 0.2, seed=8) != (train, val)
    assert sorted(train + val) == sorted(ids) and not set(train) & set(val)
    assert abs(len(val) - 60) <= 6
    index = {image_id: i for i, image_id in enumerate(ids)}
    train_counts = matrix[[index[i] for i in train]].sum(axis=0)
    val_counts = matrix[[index[i] for i in val]].sum(axis=0)
    total = matrix.sum(axis=0)
    for label in range(N_CLASSES):
        if total[label] >= 2:
            assert train_counts[label] >= 1 and val_counts[label] >= 1, f"class {label} is on one side only"
        if total[label] >= 20:
            assert abs(val_counts[label] / total[label] - 0.2) < 0.1


def test_split_rejects_bad_fraction():
    with pytest.raises(ValueError):
        splits.split(["a", "b"], np.zeros((2, N_CLASSES)), 1.0, 0)


# --- training and evaluation pipelines ----------------------------------------------------------
def test_training_dataset_is_static_infinite_and_repeatable(planted8):
    ids = [image_id(i) for i in range(10)]

    def first_batches(seed):
        dataset = pipeline.training_dataset(planted8, ids, IMAGE_SIZE, "rgb", batch_size=4, stream=Stream(seed=seed))
        assert dataset.element_spec[0].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
        return [(x.numpy(), y.numpy()) for x, y in dataset.take(6)]  # 24 images: more than one epoch of 10

    first, again, other = first_batches(1), first_batches(1), first_batches(2)
    for (x1, y1), (x2, y2) in zip(first, again):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other))
    for images, labels in first:
        assert images.min() >= 0 and images.max() <= 255
        assert labels.shape == (4, N_CLASSES)


def test_the_pipelines_are_traced_as_written_without_autograph(planted8, monkeypatch):
    """AutoGraph would parse and rewrite the source of every function the pipelines call, each lambda again at every
    build (10 s of a quick training process); their functions need none of it (`reading.as_written`)."""
    from tensorflow.python.autograph.impl import api

    converted = []
    convert = api.converted_call
    monkeypatch.setattr(
        api, "converted_call", lambda f, *args, **kwargs: converted.append(f) or convert(f, *args, **kwargs)
    )
    tf.data.Dataset.range(3).map(lambda value: value + 1)  # a map built outside them is converted: the probe works
    assert converted
    converted.clear()
    ids = [image_id(i) for i in range(10)]
    training = pipeline.training_dataset(planted8, ids, IMAGE_SIZE, "rgb", batch_size=4, stream=Stream(seed=1))
    held_out = pipeline.eval_dataset(planted8, ids, IMAGE_SIZE, "rgb", batch_size=4)
    opened = pipeline.open_dataset(planted8, IMAGE_SIZE, "rgb", with_id=True, ids=ids)
    assert converted == []
    assert next(iter(training))[0].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert sum(1 for _ in held_out.unbatch()) == sum(1 for _ in opened) == 10


@pytest.mark.parametrize("cache", [False, True], ids=["streamed", "cached"])
def test_a_stream_started_at_batch_k_is_the_whole_stream_from_batch_k(planted8, cache):
    """What a resumed run sees: the batches it would have seen had it never stopped, not epoch 1 again."""
    ids = [image_id(i) for i in range(10)]

    def batches(start_batch, count):
        dataset = pipeline.training_dataset(
            planted8, ids, IMAGE_SIZE, "rgb", batch_size=4, stream=Stream(seed=3, cache=cache, start_batch=start_batch)
        )
        return [x for x, _ in dataset.take(count).as_numpy_iterator()]

    whole = batches(0, 8)  # 32 images: passes of 10 images, batches straddle them
    for start in (3, 5):  # 12 and 20 images in: mid-pass and at a pass boundary
        for resumed, expected in zip(batches(start, 3), whole[start : start + 3], strict=True):
            np.testing.assert_array_equal(resumed, expected)
    assert not np.array_equal(whole[0], whole[5])  # a later pass is not a replay of the first
    with pytest.raises(ValueError, match="start_batch"):
        pipeline.training_dataset(planted8, None, IMAGE_SIZE, "rgb", batch_size=4, stream=Stream(start_batch=2))


def test_training_dataset_without_augment_keeps_each_image_with_its_label(planted8):
    ids = [image_id(i) for i in range(12)]
    by_label = {tuple(parse_label(label_text(i))): planted(i, 0) for i in range(12)}  # labels are unique here
    for cache in (False, True):
        dataset = pipeline.training_dataset(
            planted8, ids, IMAGE_SIZE, "rgb", batch_size=2, stream=Stream(seed=0, augment=False, cache=cache)
        )
        seen = []
        for images, labels in dataset.take(6).as_numpy_iterator():
            for image, label in zip(images, labels):
                expected = by_label[tuple(label)]
                assert image[..., 0].min() == pytest.approx(expected, abs=0.01)
                seen.append(expected)
        assert sorted(seen) == sorted(by_label.values())  # 6 batches of 2: one pass, each image once


def test_a_trace_is_read_by_position_each_once_and_two_ids_at_one_are_refused(tmp_path):
    path = tmp_path / "trace.txt"
    path.write_text("0 a\n1 b\n0 a\n1 b\n2 c\n")  # an iterator dropped after 2 images, then the stream again
    assert pipeline.read_trace(path) == ["a", "b", "c"]
    path.write_text("0 a\n0 b\n")
    with pytest.raises(ValueError, match="position 0 fed a and then b"):
        pipeline.read_trace(path)


@pytest.mark.parametrize("cache", [False, True])
def test_workers_feed_their_rows_of_the_one_worker_stream_and_resume_with_it(planted8, tmp_path, cache):
    """Two hosts' batches side by side are the one-host stream's, augmentation included, from any start batch:
    each pass feeds every image once across the hosts, and each host decodes only its own rows."""
    ids = [image_id(i) for i in range(12)]

    def batches(workers: int, worker: int, start_batch: int = 0, count: int = 9):
        trace = tmp_path / f"ids-{workers}-{worker}-{start_batch}.txt"
        stream = Stream(
            seed=5, cache=cache, start_batch=start_batch, num_workers=workers, worker_index=worker, trace=str(trace)
        )
        dataset = pipeline.training_dataset(planted8, ids, IMAGE_SIZE, "rgb", batch_size=4, stream=stream)
        found = list(dataset.take(count).as_numpy_iterator())
        return found, pipeline.read_trace(trace)

    whole, whole_ids = batches(1, 0)
    halves = [batches(2, worker) for worker in (0, 1)]
    for step, (images, labels) in enumerate(whole):
        assert [len(half[0][step][0]) for half in halves] == [2, 2]
        np.testing.assert_array_equal(np.concatenate([half[0][step][0] for half in halves]), images)
        np.testing.assert_array_equal(np.concatenate([half[0][step][1] for half in halves]), labels)
    fed = [half[1][:18] for half in halves]  # the traced IDs of the 9 batches taken (prefetching traces more)
    assert not set(fed[0][:6]) & set(fed[1][:6])
    for first in (0, 12, 24):  # passes of 12 images = 3 global batches; host k feeds rows 2k, 2k+1 of each
        per_pass = [
            image
            for step in range(first // 4, first // 4 + 3)
            for half in fed
            for image in half[2 * step : 2 * step + 2]
        ]
        assert sorted(per_pass) == sorted(ids) and per_pass == whole_ids[first : first + 12]
    resumed = batches(2, 1, start_batch=4, count=3)[0]
    for step, (images, _) in enumerate(resumed):
        np.testing.assert_array_equal(images, halves[1][0][4 + step][0])
    with pytest.raises(ValueError, match="does not split evenly"):
        pipeline.training_dataset(planted8, ids, IMAGE_SIZE, "rgb", batch_size=3, stream=Stream(num_workers=2))


def test_eval_dataset_is_ordered_and_keeps_the_last_partial_batch(planted8):
    ids = [image_id(i) for i in range(7)]
    batches = list(pipeline.eval_dataset(planted8, ids, IMAGE_SIZE, "rgb", batch_size=3).as_numpy_iterator())
    assert [len(b[0]) for b in batches] == [3, 3, 1]
    again = list(pipeline.eval_dataset(planted8, ids, IMAGE_SIZE, "rgb", batch_size=3).as_numpy_iterator())
    assert [list(b[2]) for b in batches] == [list(b[2]) for b in again]
    assert sorted(i.decode() for b in batches for i in b[2]) == sorted(ids)


def test_a_cached_eval_dataset_decodes_its_files_once(tmp_path):
    root = write_dataset(tmp_path, count=5, files=2, pngs=False)
    ids = [image_id(i) for i in range(5)]
    cached = pipeline.eval_dataset(root, ids, IMAGE_SIZE, "rgb", batch_size=2, cache=True)
    plain = pipeline.eval_dataset(root, ids, IMAGE_SIZE, "rgb", batch_size=2)
    first = read_all(cached)
    assert [len(batch[2]) for batch in first] == [2, 2, 1]
    for path in (root / "train_tfrecords").glob("*.tfrec"):
        path.write_bytes(b"")  # the files are gone: only the cache can still serve the images
    again = read_all(cached)
    assert [list(batch[2]) for batch in again] == [list(batch[2]) for batch in first]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in again]), np.concatenate([b[0] for b in first]))
    assert "truncated or corrupt" in error_of(plain)  # without the cache the emptied files are read again


def test_small_sample_reads_through_every_layout(small_sample, tmp_path):
    frame = competition.load_labels(small_sample)
    ids = list(frame["ID"])
    pngs = collect(pipeline.read_png_dir(small_sample, 32, "rgby", with_id=True))
    assert sorted(pngs) == sorted(ids)
    expected = dict(zip(ids, label_matrix(ids, frame["Label"])))
    for key, (_, label) in pngs.items():
        np.testing.assert_array_equal(label, expected[key])
    records = sorted((small_sample / "train_tfrecords").glob("*.tfrec"))
    if records:
        from_records = collect(pipeline.read_tfrecords(records, 32, "rgby", with_id=True, deterministic=False))
        assert sorted(from_records) == sorted(ids)
        for key, (image, label) in from_records.items():
            np.testing.assert_allclose(image, pngs[key][0], atol=1e-3)
            np.testing.assert_array_equal(label, expected[key])


def test_take_images_gives_numpy_previews_with_their_ids(small_sample):
    dataset = pipeline.open_dataset(small_sample, image_size=32, channels="rgby", with_id=True)
    images, labels, ids = pipeline.take_images(dataset, 3)
    frame = competition.load_labels(small_sample)
    assert images.shape == (3, 32, 32, 4) and images.dtype == np.float32 and labels.shape == (3, 19)
    expected = {row.ID: row.Label for row in frame.itertuples()}
    assert all(np.array_equal(label, parse_label(expected[image_id])) for label, image_id in zip(labels, ids))
    with pytest.raises(ValueError, match="no images"):
        pipeline.take_images(dataset.take(0), 2)
