"""Class activation maps (CAM, Zhou et al. 2016) of an image model, and the CAM cell score.

Every hpa_nb model ends in global average pooling → Dense(19, sigmoid) (`hpa_nb.training.model.build`), so a
class's logit is the average over positions of ``features · kernel[:, class] + bias``: that sum at each position is
the class's map, exact and without gradients (the same on every Keras backend). Averaged over the whole image, a map
gives back the image's own logit; averaged inside one cell's mask, it gives the cell's CAM score, as the 3rd (Puzzle-
CAM) and 7th place solutions scored cells. `cell_scores` pools a map inside each cell by area, on the map's grid;
`class_map_views` gathers what `hpa_nb.plots.cells.class_map_figure` draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import keras
import numpy as np

from hpa_nb.core.labels import parse_label
from hpa_nb.data.crops import resize_image
from hpa_nb.segmentation.images import colors_needed, image_folder, read_channels, stack_channels

POOL_LAYER, OUTPUT_LAYER = "pool", "probabilities"  # the head's layer names (hpa_nb.training.model.build)


@dataclass(frozen=True)
class ClassMaps:
    """An image model's map function: a float32 batch ``[N, S, S, C]`` (0–255) to logit maps ``[N, h, w, 19]``."""

    features: Any  # keras.Model: the input to the backbone's last feature map
    kernel: np.ndarray  # [features, 19]
    bias: np.ndarray  # [19]

    @classmethod
    def of(cls, model) -> "ClassMaps":
        """The maps of a model built by `hpa_nb.training.model.build` (found by its head's layer names)."""
        try:
            pooled, output = model.get_layer(POOL_LAYER), model.get_layer(OUTPUT_LAYER)
        except ValueError:
            raise ValueError(
                f"model {model.name} has no '{POOL_LAYER}' → '{OUTPUT_LAYER}' head: CAM needs a model "
                "built by hpa_nb.training.model.build"
            ) from None
        kernel, bias = (np.asarray(w, np.float32) for w in output.get_weights())
        return cls(keras.Model(model.inputs, pooled.input), kernel, bias)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        features = np.asarray(self.features.predict_on_batch(np.asarray(batch, np.float32)), np.float32)
        return features @ self.kernel + self.bias


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))).astype(np.float32)


def cell_scores(logit_map: np.ndarray, mask: np.ndarray, cell_ids: np.ndarray) -> np.ndarray:
    """Each cell's CAM score ``[N, 19]``: the sigmoid of the map's mean over the cell, each map position weighted by
    the share of the cell's pixels that fall in it. `logit_map` ``[h, w, 19]`` covers the whole image `mask`."""
    height, width = mask.shape
    grid_h, grid_w, classes = logit_map.shape
    rows = (np.arange(height) * grid_h // height)[:, None]
    cols = (np.arange(width) * grid_w // width)[None, :]
    position = (rows * grid_w + cols).ravel()
    index = np.full(int(mask.max()) + 1, -1)
    index[np.asarray(cell_ids, np.int64)] = np.arange(len(cell_ids))
    cell = index[mask.ravel()]
    inside = cell >= 0
    counts = np.bincount(
        cell[inside] * grid_h * grid_w + position[inside], minlength=len(cell_ids) * grid_h * grid_w
    ).reshape(len(cell_ids), grid_h * grid_w)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return sigmoid(shares @ logit_map.reshape(-1, classes))


def upsampled(logit_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """A map ``[h, w, 19]`` as probabilities at ``[height, width, 19]`` (nearest, each position a block): for views."""
    grid_h, grid_w = logit_map.shape[:2]
    rows = np.arange(height) * grid_h // height
    cols = np.arange(width) * grid_w // width
    return sigmoid(logit_map[rows][:, cols])


@dataclass
class ClassMapView:
    """One image's class maps, to draw (`hpa_nb.plots.cells.class_map_figure`)."""

    image_id: str
    channels: dict  # colour → float32 [H, W] (0–255), as read
    logit_map: np.ndarray  # [h, w, 19]
    probabilities: np.ndarray  # [19], the image model's (the maps' mean, through the sigmoid)
    truth: list[int]  # the image's classes

    def classes(self, false_ones: int = 2) -> list[int]:
        """The true classes, then the `false_ones` strongest classes the image lacks."""
        others = [c for c in np.argsort(-self.probabilities) if c not in self.truth]
        return list(self.truth) + [int(c) for c in others[:false_ones]]


def class_map_views(
    model, image_size: int, channels: str, data_dir: Path, ids: Sequence[str], labels: Mapping[str, str]
) -> list[ClassMapView]:
    """The class maps of `model` (an image run's, at its `image_size` and `channels`) for images `ids` of
    `data_dir`, with their labels (``{ID: "3|5"}``)."""
    maps = ClassMaps.of(model)
    views = []
    for image_id in ids:
        pixels = read_channels(image_folder(data_dir, image_id), image_id, colors_needed(channels))
        logit_map = maps(resize_image(stack_channels(pixels, channels), image_size)[None])[0]
        views.append(
            ClassMapView(
                image_id,
                pixels,
                logit_map,
                sigmoid(logit_map.mean(axis=(0, 1))),
                [int(c) for c in np.flatnonzero(parse_label(labels[image_id], image_id))],
            )
        )
    return views
