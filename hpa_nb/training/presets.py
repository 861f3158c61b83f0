"""KerasHub backbones from a preset (a Kaggle Models handle, or a folder written by `save_to_preset`), rebuilt with 3
or 4 channels at the size asked, keeping the preset's weights.

Each image family KerasHub ships is rebuilt from its own config, with its own shape key (EfficientNet's is
``input_shape``, every other family's ``image_shape``), then `transplant` copies the weights. What a family's
weights allow decides the sizes: the convolutional families (EfficientNet, ResNet, DenseNet, CSPNet, HGNetV2,
MobileNet) take any size; DINOv2 interpolates its position embedding (computed again here after the copy) and DINOv3
has rotary positions, so any multiple of their patch size suits them; ViT's position embedding is sized for the
preset's own size, so a pretrained ViT refuses any other in one line that names it. Whatever the family, the
backbone ends in one feature map (`feature_map`), so the head and CAM treat them all alike.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import keras
import numpy as np
from keras import layers

from hpa_nb.core.env import kaggle_input, on_kaggle, search_folders
from hpa_nb.training.backbones import PRESET_FILES, is_preset
from hpa_nb.training.transplant import SizeMismatch, extend, transplant

SHAPE_KEYS = ("image_shape", "input_shape")  # a backbone config's input shape key: EfficientNet's is input_shape
DERIVED = ("interpolated_position_embeddings",)  # DINOv2: its position embedding resized to the image, recomputed


def keras_hub():
    import keras_hub  # keras-hub: on Kaggle's TPU image; imported only for a preset backbone

    return keras_hub


def register_classes(backbone: str) -> None:
    """Register the classes a saved model of `backbone` names (a preset's are KerasHub's), before loading it."""
    if is_preset(backbone):
        keras_hub()


def resolve_preset(preset: str, environ: Mapping[str, str] = os.environ) -> str:
    """Where `preset` is read from: on Kaggle, a ``kaggle://OWNER/MODEL/FRAMEWORK/VARIATION[/VERSION]`` handle is the
    folder Kaggle mounted that model version at under /kaggle/input (attached with ``kaggle push --model``, which is
    how an internet-off kernel gets it), the newest version when none is named; elsewhere, and when nothing is
    attached, the preset as given (KerasHub downloads a handle)."""
    if not preset.startswith("kaggle://") or not on_kaggle(environ):
        return preset
    parts = preset.removeprefix("kaggle://").strip("/").split("/")[1:]  # the owner is not part of the mount

    def matches(folder: Path, files: list[str]) -> bool:  # .../MODEL/FRAMEWORK/VARIATION[/VERSION]
        named = list(folder.parts[-len(parts) :]) == parts
        a_version = folder.name.isdigit() and list(folder.parts[-len(parts) - 1 : -1]) == parts
        return all(name in files for name in PRESET_FILES) and (named or a_version)

    found = search_folders(kaggle_input(environ), matches, 8)
    if not found:
        return preset
    return str(max(found, key=lambda folder: int(folder.name) if folder.name.isdigit() else -1))


def preset_backbone(preset: str, image_size: int, channels: int, pretrained: bool) -> keras.Model:
    """A KerasHub backbone from `preset` (named "backbone", 0–255 inputs, 3 or 4 channels, `image_size` px): the
    preset's own input scaling (its ImageConverter, the 4th channel given the mean of the RGB figures; else 1/255)
    and, when `pretrained`, its weights."""
    hub = keras_hub()
    folder = resolve_preset(preset)
    source = hub.models.Backbone.from_preset(folder, load_weights=pretrained)
    target = resized(source, image_size, channels, pretrained, preset)
    try:
        converter = hub.layers.ImageConverter.from_preset(folder)
        scale, offset = converter.scale, converter.offset
    except (ValueError, FileNotFoundError):  # a preset saved from a backbone alone has no converter
        scale, offset = 1.0 / 255.0, None
    scale = scale if np.ndim(scale) == 0 else extend(np.asarray(scale), channels).tolist()
    offset = (
        0.0 if offset is None else offset if np.ndim(offset) == 0 else extend(np.asarray(offset), channels).tolist()
    )
    inputs = keras.Input((image_size, image_size, channels))
    x = layers.Rescaling(scale, offset=offset, name="preset_rescale")(inputs)
    features = target({name: x for name in target.input} if isinstance(target.input, dict) else x)  # DINO: a dict
    return keras.Model(inputs, feature_map(features, target, image_size), name="backbone")


def feature_map(features, backbone: keras.Model, image_size: int):
    """A backbone's output as one feature map (batch, height, width, channels), which the head pools and CAM reads:
    HGNetV2's dict of stage maps gives its deepest; a transformer's tokens (DINOv2, DINOv3, ViT) give their patch
    tokens laid out on the patch grid (the class and register tokens, which lead, are dropped)."""
    if isinstance(features, dict):
        features = list(features.values())[-1]
    if len(features.shape) == 3:
        patch = _patch_size(backbone.get_config())
        grid = image_size // patch
        features = layers.Cropping1D((features.shape[1] - grid * grid, 0), name="patch_tokens")(features)
        features = layers.Reshape((grid, grid, features.shape[-1]), name="patch_grid")(features)
    return features


def _patch_size(config: Mapping) -> int | None:
    patch = config.get("patch_size")
    return int(patch if np.ndim(patch) == 0 else patch[0]) if patch is not None else None


def resized(source: keras.Model, image_size: int, channels: int, pretrained: bool, preset: str = "") -> keras.Model:
    """`source` itself when it already takes `image_size` px with `channels`, else the same class built from its
    config at that shape, with its weights when `pretrained`. One line (ValueError) when the size cannot work."""
    family, config = type(source).__name__, source.get_config()
    key = next((key for key in SHAPE_KEYS if key in config), None)
    if key is None:
        raise ValueError(
            f"{preset or family}: {family} is not an image backbone (its config has no {' or '.join(SHAPE_KEYS)})"
        )
    shape, patch = tuple(config[key]), _patch_size(config)
    if patch and image_size % patch:
        lower = max(patch, image_size // patch * patch)
        raise ValueError(
            f"{preset or family}: {family} cuts images into {patch} px patches, so --image-size must be "
            f"a multiple of {patch}, such as {lower} or {lower + patch}"
        )
    if shape[-1] == channels and shape[0] in (image_size, None) and shape[1] in (image_size, None):
        return source
    target = type(source).from_config({**config, key: (image_size, image_size, channels)})
    if pretrained:
        try:
            transplant(source, target, derived=DERIVED)
        except SizeMismatch as exc:
            fix = (
                f"use --image-size {shape[0]}, the preset's own size"
                if shape[0] not in (None, image_size)
                else "use 3 channels"
            )
            raise ValueError(
                f"{preset or family}: {family} cannot take its weights at {image_size} px with {channels} "
                f"channels ({exc}): {fix}, or --weights none to train it from scratch"
            ) from None
        _interpolate_again(target)
    return target


def _interpolate_again(model: keras.Model) -> None:
    """DINOv2's embedding layer keeps its pretrained position embedding and an interpolation of it to the image's
    size (which `transplant` left as built): compute that again from the weights just copied, as loading does."""
    for layer in model._flatten_layers():
        if all(hasattr(layer, name) for name in (*DERIVED, "position_embeddings", "_interpolate_position_embeddings")):
            layer.interpolated_position_embeddings.assign(
                layer._interpolate_position_embeddings(
                    layer.position_embeddings,
                    patch_size=layer.patch_size,
                    source_shape=layer.position_embedding_shape,
                    target_shape=layer.image_shape,
                    antialias=layer.antialias_in_interpolation,
                )
            )
