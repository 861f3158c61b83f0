"""The backbones `--backbone` names, and what a weights or preset argument may be: light (no Keras import), so
that the command line and `TrainConfig` can check them without loading a framework."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple


class Backbone(NamedTuple):
    """How to build one backbone: the Keras constructor's name and which input preprocessing it expects."""

    constructor: str | None  # its name in keras.applications (resolved by hpa_nb.training.model)
    family: str  # "v1": Keras EfficientNet B0–B7, "v2": EfficientNetV2, "tiny": from scratch


BACKBONES: dict[str, Backbone] = {
    "tiny": Backbone(None, "tiny"),
    "efficientnetb0": Backbone("EfficientNetB0", "v1"),
    "efficientnetb1": Backbone("EfficientNetB1", "v1"),
    "efficientnetb2": Backbone("EfficientNetB2", "v1"),
    "efficientnetb3": Backbone("EfficientNetB3", "v1"),
    "efficientnetb4": Backbone("EfficientNetB4", "v1"),
    "efficientnetb5": Backbone("EfficientNetB5", "v1"),
    "efficientnetb6": Backbone("EfficientNetB6", "v1"),
    "efficientnetb7": Backbone("EfficientNetB7", "v1"),
    "efficientnetv2b0": Backbone("EfficientNetV2B0", "v2"),
    "efficientnetv2b1": Backbone("EfficientNetV2B1", "v2"),
    "efficientnetv2b2": Backbone("EfficientNetV2B2", "v2"),
    "efficientnetv2b3": Backbone("EfficientNetV2B3", "v2"),
    "efficientnetv2s": Backbone("EfficientNetV2S", "v2"),
}


def normalize_weights(weights: str | Path | None) -> str | None:
    """``"imagenet"``, ``None`` (also from ``"none"``) or an existing weights file path as a string."""
    if weights is None or str(weights).lower() in ("none", ""):
        return None
    if str(weights).lower() == "imagenet":
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist (use imagenet, none or a weights file)")
    if not path.name.endswith(".h5"):
        raise ValueError(f"weights file {path} must be a .weights.h5 or a Keras .h5 file")
    return str(path)


PRESET_FILES = ("config.json", "metadata.json")  # what `save_to_preset` (and a Kaggle Models version) holds


def is_preset(backbone: str) -> bool:
    """Whether `backbone` names a KerasHub preset: a handle (``kaggle://OWNER/MODEL/keras/VARIATION[/VERSION]``,
    ``hf://…``) or a preset folder, rather than a key of `BACKBONES`."""
    if backbone in BACKBONES:
        return False
    folder = Path(backbone).expanduser()
    return "://" in backbone or all((folder / name).is_file() for name in PRESET_FILES)
