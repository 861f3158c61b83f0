"""The classifier: an EfficientNet (or a tiny CNN) backbone with a multi-label sigmoid head, and its loss.

Inputs are float32 images on the 0–255 scale with 3 (RGB) or 4 (RGBY) channels; every
backbone normalises them inside the model, so the data pipeline never needs to know which
backbone it feeds. The head is global average pooling → dropout → ``Dense(19, sigmoid)``:
one independent probability per class, as a multi-label task needs (never softmax).
Batch norm follows Keras's ``training`` flag (no ``training=True`` hack).
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import keras
import numpy as np
from keras import layers, ops

from hpa_nb.core.files import atomic_path
from hpa_nb.core.labels import CHANNEL_SETS, N_CLASSES, colors_of
from hpa_nb.training.backbones import BACKBONES, is_preset, normalize_weights
from hpa_nb.training.presets import preset_backbone
from hpa_nb.training.transplant import extend, transplant

# ImageNet statistics the EfficientNets were trained with (inputs scaled to 0–1 first).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STDDEV = (0.229, 0.224, 0.225)
KAGGLE_WEIGHTS_HELP = (
    "on Kaggle, turn on Internet in the notebook settings, or attach the Keras weights file "
    "(e.g. efficientnetb0_notop.h5 from keras-applications) as a Kaggle dataset or model source "
    "and pass --weights /kaggle/input/.../efficientnetb0_notop.h5 (weights=PATH in notebooks); "
    "or train from scratch with --weights none"
)


class WeightsUnavailableError(ValueError):
    """Pretrained weights could not be fetched; a ValueError so the CLI prints it as one line."""


TINY_FILTERS = (32, 64, 128, 256)


def channel_count(channels: str | int) -> int:
    """3 for "rgb", 4 for "rgby" (an int passes through after checking)."""
    if isinstance(channels, str):
        return len(colors_of(channels))
    if channels not in {len(colors) for colors in CHANNEL_SETS.values()}:
        raise ValueError(f"channels must be one of {sorted(CHANNEL_SETS)} (or 3/4), got {channels!r}")
    return int(channels)


# --- backbones ----------------------------------------------------------------------------
def _tiny_backbone(image_size: int, channels: int) -> keras.Model:
    """Four conv–BN–ReLU blocks (about 1.2M parameters): learns fast from scratch on a CPU."""
    inputs = keras.Input((image_size, image_size, channels))
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    for block, filters in enumerate(TINY_FILTERS):
        for conv in range(2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{block}_conv{conv}")(x)
            x = layers.BatchNormalization(name=f"block{block}_bn{conv}")(x)
            x = layers.ReLU(name=f"block{block}_relu{conv}")(x)
        if block < len(TINY_FILTERS) - 1:
            x = layers.MaxPooling2D(name=f"block{block}_pool")(x)
    return keras.Model(inputs, x, name="backbone")


def _v2_preprocessing(backbone: str, channels: int) -> list[keras.layers.Layer]:
    """Keras's own EfficientNetV2 preprocessing, extended to a 4th channel by averaging the RGB statistics.

    Keras applies ImageNet normalisation to the B0–B3 variants only when there are exactly 3
    channels (and a [-1, 1] scaling otherwise), which would hand 4-channel inputs to pretrained
    filters on a different scale; so hpa_nb builds the backbone without it and adds it here.
    """
    if backbone == "efficientnetv2s":
        return [layers.Rescaling(1.0 / 128.0, offset=-1.0, name="v2_rescale")]
    mean = extend(np.array(IMAGENET_MEAN), channels)
    variance = extend(np.array(IMAGENET_STDDEV) ** 2, channels)
    return [
        layers.Rescaling(1.0 / 255.0, name="v2_rescale"),
        layers.Normalization(mean=mean.tolist(), variance=variance.tolist(), name="v2_normalize"),
    ]


def _keras_backbone(name: str, image_size: int, channels: int, weights: str | None) -> keras.Model:
    """One Keras EfficientNet without its top, 3 or 4 channels, with the given Keras ``weights`` argument."""
    spec = BACKBONES[name]
    kwargs = {"include_preprocessing": False} if spec.family == "v2" else {}
    try:
        with warnings.catch_warnings():  # 4 channels are intended here: see `transplant`
            warnings.filterwarnings("ignore", message="This model usually expects 1 or 3 input channels")
            return getattr(keras.applications, spec.constructor)(
                include_top=False, weights=weights, input_shape=(image_size, image_size, channels), **kwargs
            )
    except Exception as exc:  # noqa: BLE001  (Keras raises a bare Exception for a failed download)
        if weights == "imagenet" and "URL fetch failure" in str(exc):
            raise WeightsUnavailableError(
                f"cannot download ImageNet weights for {name} (no internet?): {KAGGLE_WEIGHTS_HELP}"
            ) from None
        raise


def _source_backbone(name: str, image_size: int, weights: str) -> keras.Model:
    """The 3-channel backbone carrying pretrained weights, with its input scaling folded into one Normalization.

    Keras's EfficientNet B0–B7 ImageNet files store the standard deviation where the variance
    belongs; with ``weights="imagenet"`` Keras adds a per-channel Rescaling to make up for it, but
    not when given a file path. A legacy ``.h5`` file is taken to be that ImageNet file (or one
    fine-tuned from it), so the same correction is applied to it.
    """
    spec = BACKBONES[name]
    source = _keras_backbone(name, image_size, 3, weights)
    if spec.family != "v1":
        return source
    normalization = next(layer for layer in source.layers if isinstance(layer, layers.Normalization))
    per_channel_scale = [
        layer for layer in source.layers if isinstance(layer, layers.Rescaling) and np.ndim(layer.scale) == 1
    ]
    if per_channel_scale:
        scale = np.asarray(per_channel_scale[0].scale, np.float32)
    elif weights != "imagenet" and not weights.endswith(".weights.h5"):
        scale = 1.0 / np.sqrt(np.array(IMAGENET_STDDEV, np.float32))
    else:
        return source
    mean, variance, count = normalization.get_weights()
    # (x - mean) / sqrt(variance) * scale == (x - mean) / sqrt(variance / scale**2)
    normalization.set_weights([mean, variance / scale**2, count])
    normalization.finalize_state()
    return source


def build_backbone(
    backbone: str = "efficientnetb0",
    image_size: int = 224,
    channels: str | int = 3,
    weights: str | Path | None = "imagenet",
) -> keras.Model:
    """The feature extractor alone (named "backbone"), taking 0–255 inputs; see `build` for the arguments.
    A KerasHub preset (`is_preset`) brings its own weights: ``weights`` "imagenet" loads them, None does not."""
    channel_total = channel_count(channels)
    if is_preset(backbone):
        return preset_backbone(backbone, image_size, channel_total, normalize_weights(weights) is not None)
    if backbone not in BACKBONES:
        raise ValueError(
            f"unknown backbone {backbone!r}; choose from {', '.join(BACKBONES)}, or a KerasHub preset "
            "(kaggle://OWNER/MODEL/keras/VARIATION, or its folder)"
        )
    weights = normalize_weights(weights)
    spec = BACKBONES[backbone]
    if spec.family == "tiny":
        if weights == "imagenet":
            raise ValueError("the tiny backbone has no ImageNet weights: use --weights none (or a tiny weights file)")
        model = _tiny_backbone(image_size, channel_total)
        if weights is not None:
            model.load_weights(weights)
        return model
    target = _keras_backbone(backbone, image_size, channel_total, None)
    if weights is not None:
        transplant(_source_backbone(backbone, image_size, weights), target)
    if spec.family == "v2":  # wrap Keras's own preprocessing, extended to 4 channels
        inputs = keras.Input((image_size, image_size, channel_total))
        x = inputs
        for layer in _v2_preprocessing(backbone, channel_total):
            x = layer(x)
        target = keras.Model(inputs, target(x), name="backbone")
    else:
        target.name = "backbone"
    return target


def build(
    backbone: str = "efficientnetb0",
    image_size: int = 224,
    channels: str | int = 3,
    weights: str | Path | None = "imagenet",
    dropout: float = 0.5,
    n_classes: int = N_CLASSES,
) -> keras.Model:
    """A multi-label classifier: backbone → global average pooling → dropout → Dense(n_classes, sigmoid).

    Args:
        backbone: a key of `BACKBONES`: "efficientnetb0".."efficientnetb7", "efficientnetv2b0".."b3",
            "efficientnetv2s", or "tiny" (a small CNN for CPU runs from scratch).
        image_size: square input side in pixels.
        channels: "rgb" / 3 or "rgby" / 4. Inputs are float32 on the 0–255 scale.
        weights: "imagenet" (downloaded by Keras), None / "none" (random), or a path to a weights
            file of the 3-channel backbone without top: Keras's own ImageNet file
            (``efficientnetb0_notop.h5``, what to attach on Kaggle without internet) or a
            ``.weights.h5`` written by `save_backbone_weights` / ``backbone.save_weights``.
            With 4 channels, the 3-channel weights are transplanted (see `transplant`).
        dropout: dropout rate before the classifier.
        n_classes: number of sigmoid outputs.

    Under a mixed-precision policy the output layer stays float32, so losses and metrics are stable.
    """
    channel_total = channel_count(channels)
    features = build_backbone(backbone, image_size, channel_total, weights)
    inputs = keras.Input((image_size, image_size, channel_total), name="image")
    x = features(inputs)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(n_classes, activation="sigmoid", dtype="float32", name="probabilities")(x)
    name = re.sub(r"[^A-Za-z0-9_]+", "_", backbone.rstrip("/").rpartition("/")[2]) if is_preset(backbone) else backbone
    return keras.Model(inputs, outputs, name=f"hpa_{name}")


def save_backbone_weights(model: keras.Model, path: str | Path) -> Path:
    """Write a trained model's backbone weights, usable as ``weights=PATH`` (any image size; 3 channels)."""
    path = Path(path)
    if not path.name.endswith(".weights.h5"):
        raise ValueError(f"backbone weights file {path} must end in .weights.h5")
    backbone = model.get_layer("backbone")
    inner = [layer for layer in backbone.layers if isinstance(layer, keras.Model)]
    with atomic_path(path) as temporary:  # the temporary name keeps the .weights.h5 Keras requires
        (inner[0] if inner else backbone).save_weights(temporary)  # a V2 backbone wraps the Keras model
    return path


# --- loss and metrics ---------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="hpa_nb")
class WeightedBinaryCrossentropy(keras.losses.Loss):
    """Binary cross-entropy with a positive weight per class, optionally focal.

    Per class c: ``-(w_c · y · log p + (1 − y) · log(1 − p))``, times ``(1 − p_t)^gamma`` when
    ``focal_gamma > 0``; averaged over classes. Positive weights (negatives/positives, from
    `hpa_nb.core.labels.class_weights`) are the multi-label answer to class imbalance, which Keras's
    per-sample ``class_weight`` cannot express.
    """

    def __init__(
        self,
        positive_weights=None,
        focal_gamma: float = 0.0,
        epsilon: float = 1e-7,
        name: str = "weighted_bce",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.positive_weights = None if positive_weights is None else [float(w) for w in positive_weights]
        self.focal_gamma = float(focal_gamma)
        self.epsilon = float(epsilon)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.clip(ops.cast(y_pred, "float32"), self.epsilon, 1.0 - self.epsilon)
        positive_weight = (
            1.0 if self.positive_weights is None else ops.convert_to_tensor(self.positive_weights, "float32")
        )
        loss = -(positive_weight * y_true * ops.log(y_pred) + (1.0 - y_true) * ops.log(1.0 - y_pred))
        if self.focal_gamma > 0:
            p_true = y_true * y_pred + (1.0 - y_true) * (1.0 - y_pred)
            loss = loss * ops.power(1.0 - p_true, self.focal_gamma)
        return ops.mean(loss, axis=-1)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(positive_weights=self.positive_weights, focal_gamma=self.focal_gamma, epsilon=self.epsilon)
        return config


@keras.saving.register_keras_serializable(package="hpa_nb")
class MultiLabelAUC(keras.metrics.AUC):
    """Keras's AUC whose ``label_weights`` survive saving (Keras writes them as a tensor it cannot read back)."""

    def get_config(self) -> dict:
        config = super().get_config()
        if self.label_weights is not None:
            config["label_weights"] = [float(w) for w in ops.convert_to_numpy(self.label_weights)]
        return config


def make_metrics(label_weights=None, n_classes: int = N_CLASSES) -> list[keras.metrics.Metric]:
    """Macro ROC AUC ("auc") and an approximate mean average precision ("map", the PR-curve AUC), per class.

    ``label_weights`` (0/1 per class) leaves out classes absent from the validation split, whose
    per-class AUC is undefined and which Keras would otherwise count as 0.
    """
    if label_weights is not None:
        label_weights = [float(w) for w in label_weights]
    return [
        MultiLabelAUC(multi_label=True, num_labels=n_classes, label_weights=label_weights, name="auc"),
        MultiLabelAUC(curve="PR", multi_label=True, num_labels=n_classes, label_weights=label_weights, name="map"),
    ]


def count_parameters(model: keras.Model) -> int:
    """All parameters, trainable or not."""
    return int(sum(math.prod(variable.shape) for variable in model.weights))


def compile_for_training(
    model, schedule, positive_weights: np.ndarray, label_weights: np.ndarray, steps_per_execution: int, focal_gamma=0.0
) -> None:
    """Compile `model` as a run trains it: Adam over the learning-rate `schedule`, the weighted (focal, where
    `focal_gamma` > 0) binary cross-entropy and the validation metrics over the classes `label_weights` keeps."""
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=WeightedBinaryCrossentropy(positive_weights, focal_gamma=focal_gamma),
        metrics=make_metrics(label_weights),
        steps_per_execution=steps_per_execution,
    )
