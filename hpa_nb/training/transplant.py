"""Pretrained weights into a backbone of the same architecture with a fourth (yellow) input channel, or another size:
`transplant` copies them layer by layer, giving yellow the mean of the RGB filters and statistics."""

from __future__ import annotations

from typing import Collection

import keras
import numpy as np
from keras import layers


class SizeMismatch(ValueError):
    """A source weight whose shape the target cannot take (one sized by the image, say)."""


def extend(values: np.ndarray, channels: int) -> np.ndarray:
    """Per-channel RGB statistics with a 4th (yellow) entry equal to their mean, when 4 channels are asked for."""
    values = np.asarray(values, np.float32)
    return values if channels == 3 else np.append(values, values.mean()).astype(np.float32)


def transplant(source: keras.Model, target: keras.Model, derived: Collection[str] = ()) -> None:
    """Copy every layer's weights from a 3-channel backbone into a 3- or 4-channel one of the same architecture.

    Layers are paired in order among those that hold weights. Where the target has a 4th input channel, the stem
    convolution gets a 4th input slice equal to the mean of the RGB slices (so yellow starts from sensible filters)
    and the input Normalization gets the mean of the RGB statistics. A variable named in `derived` keeps the
    target's value: one the target computes from the others (the caller computes it again afterwards).
    """
    source_layers = [layer for layer in source.layers if layer.weights]
    target_layers = [layer for layer in target.layers if layer.weights]
    if len(source_layers) != len(target_layers):
        raise ValueError(
            f"cannot copy weights: {len(source_layers)} layers with weights in the source, "
            f"{len(target_layers)} in the target"
        )
    for source_layer, target_layer in zip(source_layers, target_layers):
        values = []
        for source_value, target_variable in zip(source_layer.get_weights(), target_layer.weights):
            if target_variable.name in derived:
                values.append(keras.ops.convert_to_numpy(target_variable.value))
            else:
                values.append(
                    _fit_channels(
                        source_value, tuple(target_variable.shape), f"{target_layer.name}/{target_variable.name}"
                    )
                )
        target_layer.set_weights(values)
        if isinstance(target_layer, layers.Normalization):
            target_layer.finalize_state()


def _fit_channels(value: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A source weight, given a 4th input-channel entry (mean of the first three) where the target needs one."""
    if value.shape == shape:
        return value
    if (
        value.ndim == 4
        and value.shape[2] == 3
        and shape[2] == 4
        and value.shape[:2] + value.shape[3:] == (shape[:2] + shape[3:])
    ):  # conv kernel [h, w, in, out]
        return np.concatenate([value, value.mean(axis=2, keepdims=True)], axis=2)
    if value.ndim == 1 and value.shape[0] == 3 and shape == (4,):  # per-channel input statistics
        return extend(value, 4)
    raise SizeMismatch(f"cannot copy weights of {name}: shape {value.shape} does not fit {shape}")
