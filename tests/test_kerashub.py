"""KerasHub backbones for real (`hpa_nb.training.presets`): a tiny backbone of every image family KerasHub 0.32
ships, built through its own class and written with `save_to_preset` (tests/standins/kerashub_families.py), in the
December TPU-image venv, where keras-hub is (it pins a second TensorFlow through tensorflow-text, so it stays out of
the dev venv). Each family builds with RGBY at a size other than its preset's and keeps its weights, judged against
KerasHub's own loader at that size, or refuses in one line, and gives the same output when loaded in a new process; a
family of each kind then trains for one epoch with the network off, and its run predicts in a new process."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
FAMILIES = REPO / "tests" / "standins" / "kerashub_families.py"
OFFLINE = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
EVERY_FAMILY = [
    "efficientnet",
    "efficientnet2_rw",
    "resnet",
    "resnet_vd",
    "densenet",
    "cspnet",
    "hgnetv2",
    "mobilenet",
    "dinov2",
    "dinov3",
    "vit",
]


def _families(python: Path, *args: str | Path, timeout: int = 900) -> list[dict]:
    environ = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "KERAS_BACKEND")}
    environ.update(KERAS_BACKEND="jax", PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3", **OFFLINE)
    done = subprocess.run(
        [str(python), str(FAMILIES), *map(str, args)], env=environ, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def presets(tpu_python_december, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("kerashub_presets")
    written = _families(tpu_python_december, "write", folder)
    assert [row["family"] for row in written] == EVERY_FAMILY
    assert {row["class"] for row in written} == {
        "EfficientNetBackbone",
        "ResNetBackbone",
        "DenseNetBackbone",
        "CSPNetBackbone",
        "HGNetV2Backbone",
        "MobileNetBackbone",
        "DINOV2Backbone",
        "DINOV3Backbone",
        "ViTBackbone",
    }
    assert all((folder / family / "config.json").is_file() for family in EVERY_FAMILY)
    return folder


def test_every_family_builds_rgby_at_another_size_with_its_weights_or_refuses_in_one_line(tpu_python_december, presets):
    rows = {(row["family"], row["asked"]): row for row in _families(tpu_python_december, "check", presets)}
    refusals = {key: row.pop("refused") for key, row in rows.items() if "refused" in row}
    assert refusals.keys() == {("dinov2", 96), ("vit", 40)}
    assert refusals[("dinov2", 96)].endswith(
        "DINOV2Backbone cuts images into 14 px patches, so --image-size must be a multiple of 14, such as 84 or 98"
    )
    assert "ViTBackbone cannot take its weights at 40 px" in refusals[("vit", 40)]
    assert "use --image-size 32, the preset's own size" in refusals[("vit", 40)]
    assert all("\n" not in line for line in refusals.values())
    built = {key: row for key, row in rows.items() if key not in refusals}
    assert sorted({family for family, _ in built}) == sorted(EVERY_FAMILY)
    for (family, size), row in built.items():
        assert row["input"] == [None, size, size, 4], row
        assert row["output"] == row["expected"] and len(row["output"]) == 4, row  # one feature map, KerasHub's size
        # Yellow 0 leaves what KerasHub's own loader gives with RGB: every weight kept (DINOv2's position
        # embedding interpolated again from them), the stem's yellow slice the mean of its RGB slices.
        assert row["largest_difference"] <= 1e-5 * max(row["scale"], 1e-3), row
        assert (row["stem_channels"], row["yellow_is_rgb_mean"]) == (4, True), row
        # the preset's ImageConverter scaling, its 4th channel the mean of the RGB ones (else 1/255)
        expected_scale = [4.3668, 4.4643, 4.4444, 4.4252] if family == "efficientnet" else [1.0]
        assert row["rescale"] == pytest.approx(expected_scale, abs=1e-3), row

    # Every family's model as built, saved and loaded in a new process as a run's model is: the same output.
    reloaded = _families(tpu_python_december, "reload", presets)
    assert sorted((row["family"], row["asked"]) for row in reloaded) == sorted(built)
    assert all(
        row["largest_difference"] <= 1e-6 * max(built[row["family"], row["asked"]]["scale"], 1) for row in reloaded
    )


# What training adds to a family is the same head, loss and saving for every one of them; what differs between
# families is the backbone as built (above, all 11). So one family of each way presets.py builds one trains here:
# a preset ImageConverter and EfficientNet's input_shape key; a dict of feature maps (HGNetV2); patch tokens with a
# position embedding interpolated again (DINOv2); a ViT at its own size. (Kaggle's August set trains a ResNet
# preset: test_kaggle_tpu_image.)
TRAINED = ["efficientnet", "hgnetv2", "dinov2", "vit"]


def test_a_family_of_each_kind_trains_rgby_offline_and_its_run_predicts_in_a_new_process(
    tpu_python_december, presets, small_sample, tmp_path
):
    trained = _families(tpu_python_december, "train", presets, small_sample, tmp_path, *TRAINED)  # ViT at its 32 px
    assert trained == [{"family": family, "status": 0} for family in TRAINED]
    predicted = _families(tpu_python_december, "predict", tmp_path, *TRAINED)
    for family, row in zip(TRAINED, predicted, strict=True):
        assert row == {"family": family, "backbone": str(presets / family), "shape": [3, 19], "in_0_1": True}
