"""Cell tiles: what a tile holds, reading them through the data layer, restarting after a kill, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import kill_when_written
from PIL import Image

from hpa_nb.core.budget import DiskBudgetError
from hpa_nb.data import pipeline, tiles
from hpa_nb.data.crops import cell_crops
from hpa_nb.sample.writer import write_sample
from hpa_nb.segmentation.images import read_channels, read_mask, stack_channels

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def true_tiles(small_sample, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiles") / "tiles"
    tiles.write_tiles(small_sample, out, size=32, segmentation="masks", images_per_file=7, progress=False)
    return out


def test_one_tile_per_true_cell_as_the_cell_scorer_crops_it_with_the_image_label(small_sample, true_tiles):
    manifest = tiles.read_manifest(true_tiles)
    train = pd.read_csv(small_sample / "train.csv")
    cells = pd.read_csv(small_sample / "cells.csv")
    assert manifest["complete"] and manifest["images"] == len(train)
    assert manifest["count"] == cells["ID"].isin(train["ID"]).sum()
    assert [f["images"] for f in manifest["files"]] == [7] * (len(train) // 7) + [len(train) % 7]
    crops, info = tiles.load_tiles(true_tiles)
    assert len(info) == manifest["count"] and info["key"].is_unique
    assert info["key"].tolist() == tiles.tile_keys(manifest)
    labels = dict(zip(train["ID"], train["Label"]))
    for row in info.index[[0, len(info) // 2, len(info) - 1]]:
        image_id, cell_id = info.loc[row, "image_id"], info.loc[row, "cell_id"]
        assert sorted(info.loc[row, "label"].split("|"), key=int) == sorted(labels[image_id].split("|"), key=int)
        image = stack_channels(read_channels(small_sample / "train", image_id), "rgby")
        mask = read_mask(small_sample, image_id)
        _, expected = cell_crops(image, mask, 32, [cell_id])
        np.testing.assert_array_equal(crops[row], np.clip(np.rint(expected[0]), 0, 255).astype(np.uint8))
        cell = mask == cell_id
        rows, columns = np.flatnonzero(cell.any(axis=1)), np.flatnonzero(cell.any(axis=0))
        assert info.loc[row, "box"] == (rows[0], columns[0], rows[-1] + 1, columns[-1] + 1)
        assert info.loc[row, "area_fraction"] == pytest.approx(cell.mean())
        edge = cell[0].any() or cell[-1].any() or cell[:, 0].any() or cell[:, -1].any()
        assert info.loc[row, "border"] == edge


def test_a_tile_shows_its_own_cell_only_and_knows_the_border(tmp_path):
    image = np.zeros((40, 60, 4), np.float32)
    mask = np.zeros((40, 60), np.uint16)
    mask[5:20, 5:25], image[5:20, 5:25] = 1, 10.0  # the cell: dim
    mask[5:20, 25:45], image[5:20, 25:45] = 2, 255.0  # its neighbour, inside the first cell's square: bright
    mask[30:40, 50:60], image[30:40, 50:60] = 3, 100.0  # in the corner: touches the border
    cut = tiles.cut_tiles(image, mask, "x", 16)
    assert cut.cell_ids.tolist() == [1, 2, 3] and cut.crops.dtype == np.uint8
    assert cut.crops[0].max() == 10  # neither the neighbour nor anything but zeros and the cell's own pixels
    assert cut.boxes.tolist() == [[5, 5, 20, 25], [5, 25, 20, 45], [30, 50, 40, 60]]
    np.testing.assert_allclose(cut.area_fractions, [300 / 2400, 300 / 2400, 100 / 2400])
    assert cut.border.tolist() == [False, False, True]


def test_tiles_are_read_through_the_data_layer_by_image(small_sample, true_tiles):
    manifest = tiles.read_manifest(true_tiles)
    some = manifest["files"][1]["ids"][:3]
    keys = tiles.tile_keys(manifest, some)
    read = pipeline.open_dataset(small_sample, 24, "rgb", with_id=True, ids=keys, shards=true_tiles)
    found = [(key.decode(), image.shape, image.dtype) for image, _, key in read.as_numpy_iterator()]
    assert sorted(key for key, _, _ in found) == sorted(keys) and {(s, d) for _, s, d in found} == {
        ((24, 24, 3), np.dtype("float32"))
    }
    assert "cell tiles" in pipeline.describe_layout(small_sample, "rgb", true_tiles)
    batch, labels = next(
        iter(pipeline.training_dataset(small_sample, keys, 24, "rgb", batch_size=4, shards=true_tiles))
    )
    assert batch.shape == (4, 24, 24, 3) and labels.shape == (4, 19)
    by_image = list(tiles.read_tiles(true_tiles, image_ids=some).as_numpy_iterator())
    assert len(by_image) == len(keys) and by_image[0][0].shape == (32, 32, 4)


def test_png_tiles_hold_the_same_pixels_in_fewer_bytes(small_sample, true_tiles, tmp_path):
    packed = tiles.write_tiles(
        small_sample, tmp_path / "png", size=32, segmentation="masks", encoding="png", progress=False
    )
    assert packed["encoding"] == "png" and packed["bytes"] < tiles.read_manifest(true_tiles)["bytes"]
    raw_crops, raw_info = tiles.load_tiles(true_tiles)
    png_crops, png_info = tiles.load_tiles(tmp_path / "png")
    np.testing.assert_array_equal(png_crops, raw_crops)
    assert png_info["key"].tolist() == raw_info["key"].tolist()
    through_reader = {key: image for image, _, key in tiles.read_tiles(tmp_path / "png").as_numpy_iterator()}
    np.testing.assert_array_equal(through_reader[raw_info["key"][0].encode()], raw_crops[0].astype(np.float32))
    with pytest.raises(ValueError, match="encoding must be one of"):
        tiles.write_tiles(small_sample, tmp_path / "jpeg", size=32, segmentation="masks", encoding="jpeg")


def test_tiles_stop_before_writing_more_when_the_projection_is_over_the_disk_budget(small_sample, tmp_path, capsys):
    with pytest.raises(
        DiskBudgetError,
        match=r"tiles of .*: .* kB per image, so the 40 images would need .* GB, "
        r"over the 1e-06 GB budget",
    ):
        tiles.write_tiles(
            small_sample, tmp_path / "t", size=32, segmentation="masks", images_per_file=50, max_gb=1e-6, progress=False
        )
    assert "projection: tiles of" in capsys.readouterr().err  # the line comes before the stop
    assert not list((tmp_path / "t").glob("tiles-*")) and not (tmp_path / "t" / tiles.MANIFEST).exists()


def test_tiles_of_a_16_bit_sample_match_the_8_bit_ones(tmp_path):
    crops = {}
    for depth in (8, 16):
        root = write_sample(
            tmp_path / f"b{depth}", images=6, size=64, seed=4, bit_depth=depth, test_images=0, progress=False
        )
        tiles.write_tiles(root, size=32, segmentation="masks", progress=False)
        crops[depth] = tiles.load_tiles(root / "tiles")[0].astype(int)
    assert crops[8].shape == crops[16].shape and np.abs(crops[8] - crops[16]).max() <= 2


def test_bad_images_are_named_in_one_line_or_skipped(small_sample, tmp_path, cli):
    root = tmp_path / "data"
    shutil.copytree(small_sample, root, ignore=shutil.ignore_patterns("tiles", "shards"))
    ids = pd.read_csv(root / "train.csv")["ID"].tolist()
    (root / "train" / f"{ids[3]}_green.png").write_bytes(b"not a png")
    (root / "train" / f"{ids[5]}_blue.png").unlink()
    result = cli("tiles", "--src", root, "--out", tmp_path / "t", "--size", "16", "--segmentation", "masks")
    assert result.status == 2 and len(result.errors) == 1 and "Traceback" not in result.err, result.err[-2000:]
    assert f"{ids[3]}_green.png" in result.errors[0]  # the first bad image in train.csv order, by its file
    result = cli(
        "tiles", "--src", root, "--out", tmp_path / "t", "--size", "16", "--segmentation", "masks", "--skip-bad"
    )
    assert result.status == 0 and "skipped 2" in result.err
    manifest = tiles.read_manifest(tmp_path / "t")
    assert manifest["images"] == len(ids) - 2 and manifest["skipped"] == 2
    listed = tiles.image_labels(manifest)
    assert ids[3] not in listed and ids[5] not in listed
    assert (
        cli("tiles", "--src", root, "--out", tmp_path / "u", "--size", "16", "--segmentation", "cellpose").status == 2
    )


@pytest.mark.slow
def test_a_killed_tiles_run_goes_on_in_a_fresh_process(default_sample, tmp_path):
    out = tmp_path / "tiles"
    command = [
        sys.executable,
        "-m",
        "hpa_nb",
        "tiles",
        "--src",
        str(default_sample),
        "--out",
        str(out),
        "--size",
        "32",
        "--images-per-file",
        "20",
    ]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    kill_when_written(command, out / "tiles-00001.tfrec", environment)
    assert not (out / tiles.MANIFEST).exists()
    kept = {path.name: path.read_bytes() for path in out.glob(tiles.TILE_GLOB)}
    resumed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"already in {len(kept)} files" in resumed.stderr
    manifest = tiles.read_manifest(out)
    train_ids = pd.read_csv(default_sample / "train.csv")["ID"].tolist()
    listed = [image_id for entry in manifest["files"] for image_id in entry["ids"]]
    assert sorted(listed) == sorted(train_ids) and manifest["complete"]
    assert all((out / name).read_bytes() == content for name, content in kept.items())  # finished files untouched
    assert not list(out.glob(".tmp-*"))
    _, info = tiles.load_tiles(out)
    assert info["key"].tolist() == tiles.tile_keys(manifest)
    sidecars = {entry["file"]: json.loads((out / f"{entry['file']}.json").read_text()) for entry in manifest["files"]}
    assert all(s["size"] == 32 and s["segmentation"] == "classical" for s in sidecars.values())
    assert Image.open(default_sample / "masks" / f"{train_ids[0]}.png").mode == "I;16"


def test_tiles_stopped_at_a_deadline_are_adopted_by_the_next_session(small_sample, tmp_path):
    first = tmp_path / "session1" / "tiles"
    stopped = tiles.write_tiles(
        small_sample, first, size=16, segmentation="masks", images_per_file=7, progress=False, deadline=time.time() - 1
    )  # already past: stop after the first file
    assert (stopped["complete"], stopped["images"], len(stopped["files"])) == (False, 7, 1)
    second = tmp_path / "session2" / "tiles"  # the next session starts with an empty working folder
    assert tiles.adopt_tiles(first, second) == 1
    finished = tiles.write_tiles(small_sample, second, size=16, segmentation="masks", images_per_file=7, progress=False)
    assert finished["complete"] and finished["images"] == len(pd.read_csv(small_sample / "train.csv"))
    assert finished["files"][0] == stopped["files"][0]
    assert (second / "tiles-00000.tfrec").read_bytes() == (first / "tiles-00000.tfrec").read_bytes()
