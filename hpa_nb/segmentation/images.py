"""An image's stains and (for the sample) its true cell mask, read at full size from the PNG folders as numpy."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
from PIL import Image

from hpa_nb.core.labels import COLORS, colors_of


def read_channel(path: Path) -> np.ndarray:
    """One greyscale PNG (8- or 16-bit) as float32 on the 0–255 scale."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    with Image.open(path) as image:
        pixels = np.asarray(image)
    if pixels.ndim != 2:
        raise ValueError(f"image {path} is not greyscale (shape {pixels.shape})")
    scale = 255.0 / 65535.0 if pixels.dtype.itemsize > 1 else 1.0
    return pixels.astype(np.float32) * np.float32(scale)


def read_channels(folder: Path, image_id: str, colors: Iterable[str] = COLORS) -> dict[str, np.ndarray]:
    """``{color: float32 [H, W]}`` for ``folder/{image_id}_{color}.png``, all of one size."""
    folder = Path(folder)
    channels = {color: read_channel(folder / f"{image_id}_{color}.png") for color in colors}
    # Checked here, once, so a mismatch names its file instead of failing later inside np.stack.
    first = next(iter(channels), None)
    for color, pixels in channels.items():
        if pixels.shape != channels[first].shape:
            (height, width), (first_height, first_width) = pixels.shape, channels[first].shape
            raise ValueError(
                f"image {image_id}: {folder / f'{image_id}_{color}.png'} is {width}×{height} px, "
                f"but {image_id}_{first}.png is {first_width}×{first_height} px"
            )
    return channels


def stack_channels(channels: Mapping[str, np.ndarray], channel_mode: str) -> np.ndarray:
    """The model's input layout: ``[H, W, C]`` in the order of `hpa_nb.core.labels.CHANNEL_SETS`."""
    return np.stack([channels[color] for color in colors_of(channel_mode)], axis=-1)


def colors_needed(*channels: str) -> list[str]:
    """The stains one prediction reads: the models' channels plus red, blue and yellow for segmentation."""
    return sorted(
        {color for mode in channels for color in colors_of(mode)} | {"red", "blue", "yellow"}, key=COLORS.index
    )


def read_mask(data_dir: Path, image_id: str) -> np.ndarray:
    """The ground-truth instance mask ``masks/{ID}.png`` of a sample (uint16, 0 = background)."""
    path = Path(data_dir) / "masks" / f"{image_id}.png"
    if not path.is_file():
        raise FileNotFoundError(f"mask {path} does not exist (only the synthetic sample has ground-truth masks)")
    with Image.open(path) as image:
        return np.asarray(image).astype(np.uint16)


def image_folder(data_dir: Path, image_id: str) -> Path:
    """``train/`` or ``test/``, whichever holds the image's red PNG."""
    for subset in ("train", "test"):
        folder = Path(data_dir) / subset
        if (folder / f"{image_id}_red.png").is_file():
            return folder
    raise FileNotFoundError(f"image {image_id}: no {image_id}_red.png under {data_dir}/train or {data_dir}/test")
