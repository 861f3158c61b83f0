"""Tiny backbones of every image family KerasHub 0.32 ships, built through its real classes and written with
`save_to_preset`, as a Kaggle Models version holds them. Run in a venv that has keras-hub (the TPU-image sets):
``python kerashub_families.py write FOLDER [FAMILY ...]`` writes FOLDER/FAMILY for each and prints one JSON line per
family: its class, the preset's image shape, the size the tests ask for, and its parameter count.
``python kerashub_families.py check FOLDER [FAMILY ...]`` builds each with `hpa_nb.training.model.build_backbone` at
the size asked with RGBY and the preset's weights, and prints one JSON line: its output next to the output of
KerasHub's own `from_preset` at that size with RGB (its loader is the oracle: yellow 0 must change nothing), or the
one line it refused with; it saves each model it built, and its output, under FOLDER/built.
``python kerashub_families.py reload FOLDER [FAMILY ...]`` loads each saved model in a new process, as a run's
model is loaded, and prints how far its output is from the output it gave when built.
``python kerashub_families.py train FOLDER DATA RUNS [FAMILY ...]`` runs ``python -m hpa_nb train --backbone
FOLDER/FAMILY --channels rgby`` (in this process, one family after another) for one quick epoch at the first size
asked, into RUNS/FAMILY, and prints each one's exit status. ``python kerashub_families.py predict RUNS [FAMILY ...]``
loads each run's model, as a new process does, and prints what it predicts for a batch of 3.

The sizes: a convolutional family is asked for 96 px from a preset at another size (or at any size); DINOv2 (patch
14, position embedding for 70 px) and DINOv3 (patch 16, rotary positions) for a multiple of the patch other than the
preset's, and DINOv2 for 96 px too, which is no multiple of 14; ViT (position embedding for 32 px) for its own 32 px
(the one it trains at), then for 40 px, which a pretrained ViT must refuse."""

from __future__ import annotations

import json
import sys
from pathlib import Path

# (EfficientNet keeps the default num_features: KerasHub's get_config leaves it out, so a preset saved with another
# would not load.)
# family: (KerasHub class, its tiny arguments, the size the tests ask for, or the sizes: the first is the one to train)
FAMILIES = {
    "efficientnet": (
        "EfficientNetBackbone",
        dict(
            stackwise_width_coefficients=[0.25] * 3,
            stackwise_depth_coefficients=[0.5] * 3,
            stackwise_kernel_sizes=[3, 3, 5],
            stackwise_num_repeats=[1, 2, 2],
            stackwise_input_filters=[32, 16, 24],
            stackwise_output_filters=[16, 24, 40],
            stackwise_expansion_ratios=[1, 6, 6],
            stackwise_squeeze_and_excite_ratios=[0.25] * 3,
            stackwise_strides=[1, 2, 2],
            stackwise_block_types=["v1"] * 3,
            stackwise_force_input_filters=[0] * 3,
            stackwise_nores_option=[False] * 3,
            input_shape=(64, 64, 3),
        ),
        96,
    ),
    "efficientnet2_rw": (
        "EfficientNetBackbone",
        dict(
            stackwise_width_coefficients=[0.25] * 4,
            stackwise_depth_coefficients=[0.5] * 4,
            stackwise_kernel_sizes=[3] * 4,
            stackwise_num_repeats=[1, 2, 2, 2],
            stackwise_input_filters=[24, 24, 48, 64],
            stackwise_output_filters=[24, 48, 64, 128],
            stackwise_expansion_ratios=[1, 4, 4, 4],
            stackwise_squeeze_and_excite_ratios=[0, 0, 0, 0.25],
            stackwise_strides=[1, 2, 2, 2],
            stackwise_block_types=["fused"] * 3 + ["unfused"],
            stackwise_force_input_filters=[0] * 4,
            stackwise_nores_option=[False] * 4,
            input_shape=(None, None, 3),
        ),
        96,
    ),
    "resnet": (
        "ResNetBackbone",
        dict(
            input_conv_filters=[16],
            input_conv_kernel_sizes=[7],
            stackwise_num_filters=[64, 32],
            stackwise_num_blocks=[1, 1],
            stackwise_num_strides=[1, 2],
            block_type="bottleneck_block",
            use_pre_activation=False,
            image_shape=(None, None, 3),
        ),
        96,
    ),
    "resnet_vd": (
        "ResNetBackbone",
        dict(
            input_conv_filters=[8, 8, 16],
            input_conv_kernel_sizes=[3, 3, 3],
            stackwise_num_filters=[64, 32],
            stackwise_num_blocks=[1, 1],
            stackwise_num_strides=[1, 2],
            block_type="bottleneck_block_vd",
            use_pre_activation=False,
            image_shape=(64, 64, 3),
        ),
        96,
    ),
    "densenet": (
        "DenseNetBackbone",
        dict(stackwise_num_repeats=[2, 2], compression_ratio=0.5, growth_rate=4, image_shape=(64, 64, 3)),
        96,
    ),
    "cspnet": (
        "CSPNetBackbone",
        dict(
            stem_filters=16,
            stem_kernel_size=3,
            stem_strides=1,
            stackwise_strides=2,
            stackwise_depth=[1, 1],
            stackwise_num_filters=[16, 24],
            image_shape=(None, None, 3),
            down_growth=True,
            bottle_ratio=(0.5, 1.0),
            block_ratio=(1.0, 0.5),
            expand_ratio=(2.0, 1.0),
            block_type="dark_block",
            stage_type="csp",
            stem_padding="same",
        ),
        96,
    ),
    "hgnetv2": (
        "HGNetV2Backbone",
        dict(
            embedding_size=16,
            stem_channels=[3, 8, 16],
            hidden_act="relu",
            use_learnable_affine_block=False,
            image_shape=(64, 64, 3),
            depths=[1, 1],
            hidden_sizes=[32, 64],
            stackwise_stage_filters=[[16, 8, 32, 1, 1, 3], [32, 16, 64, 1, 1, 3]],
            apply_downsample=[False, True],
            use_lightweight_conv_block=[False, False],
        ),
        96,
    ),
    "mobilenet": (
        "MobileNetBackbone",
        dict(
            stackwise_expansion=[[16, 24], [32, 48]],
            stackwise_num_blocks=[2, 2],
            stackwise_num_filters=[[8, 8], [16, 16]],
            stackwise_kernel_size=[[3, 3], [5, 5]],
            stackwise_num_strides=[[2, 1], [2, 1]],
            stackwise_se_ratio=[[None, None], [0.25, 0.25]],
            stackwise_activation=[["relu", "relu"], ["hard_swish", "hard_swish"], ["hard_swish"]],
            stackwise_padding=[[1, 1], [2, 2]],
            output_num_filters=64,
            input_activation="hard_swish",
            output_activation="hard_swish",
            input_num_filters=8,
            image_shape=(64, 64, 3),
            depthwise_filters=8,
            depthwise_stride=2,
            depthwise_residual=False,
            squeeze_and_excite=0.5,
            last_layer_filter=48,
        ),
        96,
    ),
    "dinov2": (
        "DINOV2Backbone",
        dict(
            patch_size=14,
            num_layers=2,
            hidden_dim=16,
            num_heads=2,
            intermediate_dim=64,
            layer_scale_init_value=1.0,
            num_register_tokens=0,
            use_swiglu_ffn=False,
            image_shape=(70, 70, 3),
            position_embedding_shape=(70, 70, 3),
        ),
        (84, 96),
    ),
    "dinov3": (
        "DINOV3Backbone",
        dict(
            patch_size=16,
            num_layers=2,
            hidden_dim=16,
            num_heads=2,
            intermediate_dim=64,
            layer_scale_init_value=1.0,
            num_register_tokens=4,
            use_gated_mlp=False,
            image_shape=(64, 64, 3),
        ),
        96,
    ),
    "vit": (
        "ViTBackbone",
        dict(image_shape=(32, 32, 3), patch_size=(4, 4), num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32),
        (32, 40),
    ),
}


def sizes(family: str) -> tuple[int, ...]:
    asked = FAMILIES[family][2]
    return asked if isinstance(asked, tuple) else (asked,)


# The EfficientNet preset carries an ImageConverter too, as KerasHub's published ones do: per-channel scales (no
# offset, so a yellow 0 stays 0 and KerasHub's own model remains the oracle).
CONVERTER_SCALE = {"efficientnet": [1 / (255 * 0.229), 1 / (255 * 0.224), 1 / (255 * 0.225)]}


def write(folder: Path, family: str) -> dict:
    import keras_hub

    name, arguments, asked = FAMILIES[family]
    backbone = getattr(keras_hub.models, name)(**arguments)
    backbone.save_to_preset(str(folder / family))
    if family in CONVERTER_SCALE:
        converter = keras_hub.layers.EfficientNetImageConverter(image_size=(64, 64), scale=CONVERTER_SCALE[family])
        converter.save_to_preset(str(folder / family))
    shape = arguments.get("image_shape", arguments.get("input_shape"))
    return {
        "family": family,
        "class": name,
        "preset_shape": list(shape),
        "asked": list(sizes(family)),
        "parameters": int(backbone.count_params()),
    }


def check(folder: Path, family: str, asked: int) -> dict:
    import keras_hub
    import numpy as np

    from hpa_nb.training.model import build_backbone
    from hpa_nb.training.presets import feature_map

    name, arguments, _ = FAMILIES[family]
    key = "input_shape" if "input_shape" in arguments else "image_shape"
    try:
        ours = build_backbone(str(folder / family), asked, "rgby", "imagenet")
    except ValueError as exc:
        return {"family": family, "asked": asked, "refused": str(exc)}
    rgb = np.random.default_rng(0).uniform(0, 255, (2, asked, asked, 3)).astype("float32")
    theirs = keras_hub.models.Backbone.from_preset(str(folder / family), **{key: (asked, asked, 3)})
    scale = np.asarray(CONVERTER_SCALE.get(family, 1 / 255.0), "float32")
    scaled = {name: rgb * scale for name in theirs.input} if isinstance(theirs.input, dict) else rgb * scale
    expected = np.asarray(feature_map(theirs(scaled), theirs, asked))
    got = np.asarray(ours(np.concatenate([rgb, np.zeros_like(rgb[..., :1])], axis=-1)))
    built = folder / "built"  # for `reload`: the model as built, and what it gave
    built.mkdir(exist_ok=True)
    ours.save(built / f"{family}-{asked}.keras")
    np.save(built / f"{family}-{asked}.npy", got)
    stem = next(weight for weight in ours.weights if len(weight.shape) == 4)
    kernel = np.asarray(stem.value)
    rescale = np.atleast_1d(np.asarray(ours.get_layer("preset_rescale").scale, "float32"))
    return {
        "rescale": [round(float(value) * 255, 4) for value in rescale],
        "family": family,
        "asked": asked,
        "input": list(ours.input_shape),
        "output": list(got.shape),
        "expected": list(expected.shape),
        "largest_difference": float(np.abs(got - expected).max()),
        "scale": float(np.abs(expected).max()),
        "stem_channels": int(kernel.shape[2]),
        "yellow_is_rgb_mean": bool(np.allclose(kernel[:, :, 3], kernel[:, :, :3].mean(axis=2), atol=1e-6)),
    }


def reload(folder: Path, family: str, asked: int) -> dict | None:
    """The model `check` built and saved, loaded in this new process as a run's model is (the preset's classes
    registered first), given the same input: how far its output is from what it gave when built."""
    import keras
    import numpy as np

    from hpa_nb.training.presets import register_classes

    saved = folder / "built" / f"{family}-{asked}.keras"
    if not saved.is_file():  # refused
        return None
    register_classes(str(folder / family))
    model = keras.saving.load_model(saved, compile=False)
    rgb = np.random.default_rng(0).uniform(0, 255, (2, asked, asked, 3)).astype("float32")
    got = np.asarray(model(np.concatenate([rgb, np.zeros_like(rgb[..., :1])], axis=-1)))
    built = np.load(saved.with_suffix(".npy"))
    return {"family": family, "asked": asked, "largest_difference": float(np.abs(got - built).max())}


def train(folder: Path, data: Path, runs: Path, family: str) -> dict:
    from hpa_nb import cli

    status = cli.main(
        [
            "train",
            "--quick",
            "--backbone",
            str(folder / family),
            "--weights",
            "imagenet",
            "--channels",
            "rgby",
            "--data",
            str(data),
            "--out",
            str(runs / family),
            "--image-size",
            str(sizes(family)[0]),
            "--epochs",
            "1",
            "--steps-per-epoch",
            "2",
            "--batch-size",
            "4",
        ]
    )
    return {"family": family, "status": status}


def predict(runs: Path, family: str) -> dict:
    import numpy as np

    from hpa_nb.training.run import load_config, load_model

    model, size = load_model(runs / family), load_config(runs / family).data.image_size
    predicted = np.asarray(model.predict_on_batch(np.random.default_rng(0).uniform(0, 255, (3, size, size, 4))))
    return {
        "family": family,
        "backbone": load_config(runs / family).model.backbone,
        "shape": list(predicted.shape),
        "in_0_1": bool(np.all((predicted >= 0) & (predicted <= 1))),
    }


if __name__ == "__main__":
    command, root, rest = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    if command == "train":
        data, runs, rest = Path(rest[0]), Path(rest[1]), rest[2:]
    for family in rest or FAMILIES:
        if command == "write":
            print(json.dumps(write(root, family)), flush=True)
        elif command == "check":
            for size in sizes(family):
                print(json.dumps(check(root, family, size)), flush=True)
        elif command == "reload":
            for size in sizes(family):
                if (row := reload(root, family, size)) is not None:
                    print(json.dumps(row), flush=True)
        elif command == "train":
            print(json.dumps(train(root, data, runs, family)), flush=True)
        else:
            print(json.dumps(predict(root, family)), flush=True)
