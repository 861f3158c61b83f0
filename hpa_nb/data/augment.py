"""Stateless, seeded augmentation for microscopy images on the 0–255 scale.

Every random choice comes from ``tf.random.stateless_*`` and a seed, so the same seed gives
the same image on every run (the baseline's ``tf.random.uniform`` rotation did not). Geometric
transforms move all channels together (a protein must stay over its own nucleus); labels are
never touched, because flips and rotations do not change where a protein sits in the cell.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import tensorflow as tf

MAX_VALUE = 255.0
BRIGHTNESS_DELTA = 0.08 * MAX_VALUE  # added to every channel alike
CONTRAST_RANGE = (0.8, 1.2)  # scales each channel around its mean
SATURATION_RANGE = (0.8, 1.2)  # 3 channels: blends each pixel with its grey value
CHANNEL_GAIN_RANGE = (0.9, 1.1)  # 4 channels: one gain per channel (the stains vary independently)


def _seed(seed: int | Sequence[int] | tf.Tensor) -> tf.Tensor:
    """A stateless-op seed of shape [2] from an int, a pair or a tensor."""
    seed = tf.convert_to_tensor(seed)
    if seed.shape.rank == 0:
        seed = tf.stack([tf.cast(seed, tf.int64), tf.constant(0, tf.int64)])
    return tf.cast(seed, tf.int64)


def _saturation(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    factor = tf.random.stateless_uniform([], seed, *SATURATION_RANGE)
    grey = tf.reduce_mean(image, axis=-1, keepdims=True)
    return grey + factor * (image - grey)


def _channel_gain(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    gains = tf.random.stateless_uniform([tf.shape(image)[-1]], seed, *CHANNEL_GAIN_RANGE)
    return image * gains


# The colour jitter depends on what the channels are: three form an RGB picture, four are stains.
COLOUR_JITTER: dict[int, Callable[[tf.Tensor, tf.Tensor], tf.Tensor]] = {3: _saturation, 4: _channel_gain}


def _quarter_turns(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    return tf.image.rot90(image, tf.random.stateless_uniform([], seed, 0, 4, dtype=tf.int32))


def _brightness(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    return image + tf.random.stateless_uniform([], seed, -BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)


def _contrast(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    return tf.image.stateless_random_contrast(image, *CONTRAST_RANGE, seed=seed)


def _colour(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    jitter = COLOUR_JITTER.get(image.shape[-1])
    return jitter(image, seed) if jitter else image


# The chain, in order. Each step draws from its own slice of the seed, so showing one step alone
# (the notebook preview) gives exactly what that step does inside the full chain.
STEPS: dict[str, Callable[[tf.Tensor, tf.Tensor], tf.Tensor]] = {
    "flip left-right": lambda image, seed: tf.image.stateless_random_flip_left_right(image, seed),
    "flip up-down": lambda image, seed: tf.image.stateless_random_flip_up_down(image, seed),
    "rotate k·90°": _quarter_turns,
    "brightness": _brightness,
    "contrast": _contrast,
    "colour (saturation / per-stain gain)": _colour,
}
SEEDS_NEEDED = len(STEPS)


def augment(image: tf.Tensor, seed: int | Sequence[int] | tf.Tensor, steps: Iterable[str] | None = None) -> tf.Tensor:
    """Randomly flip, rotate by k·90° and jitter brightness, contrast and colour: one image ``[H, W, C]``.

    `seed` is an int or a pair of ints (e.g. ``(run_seed, element_index)``); the same seed and
    image give the same result, eagerly or inside ``Dataset.map``. `steps` picks a subset of
    `STEPS` by name (previews); None runs the whole chain. The output stays on the 0–255
    scale, clipped, with the input's static shape (square images keep it under rot90).
    """
    image = tf.convert_to_tensor(image, tf.float32)
    static_shape = image.shape
    chosen = set(STEPS) if steps is None else set(steps)
    unknown = chosen - set(STEPS)
    if unknown:
        raise ValueError(f"unknown augmentation step(s) {sorted(unknown)}; choose from {list(STEPS)}")
    seeds = tf.random.experimental.stateless_split(_seed(seed), SEEDS_NEEDED)
    for index, (name, step) in enumerate(STEPS.items()):
        if name in chosen:
            image = step(image, seeds[index])
    image = tf.clip_by_value(image, 0.0, MAX_VALUE)
    if static_shape.is_fully_defined() and static_shape[0] == static_shape[1]:
        image = tf.ensure_shape(image, static_shape)  # rot90 with a tensor k forgets the shape
    return image


def preview_pairs(
    images: Iterable[np.ndarray] | np.ndarray | tf.Tensor, seed: int = 0, steps: Iterable[str] | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(before, after), ...]`` for a notebook preview: image i is augmented with seed ``(seed, i)``."""
    pairs = []
    for index, image in enumerate(images):
        before = np.asarray(image, dtype=np.float32)
        after = augment(before, (seed, index), steps).numpy()
        pairs.append((before, after))
    return pairs
