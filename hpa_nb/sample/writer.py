"""An HPA-like synthetic data set in the exact competition layout, deterministic per seed.

Each image holds a few cells with a blue nucleus, red microtubules and yellow perinuclear ER;
the green channel shows a class-specific pattern for every label its cells carry. Besides the
competition files it writes ground truth for cell-level work: ``masks/{ID}.png`` (uint16
instance ids) and ``cells.csv`` (per-cell labels), plus ``sample.json`` (the parameters).
"""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from hpa_nb.core.labels import COLORS, N_CLASSES, NEGATIVE
from hpa_nb.data.competition import encode_record, write_tfrecord
from hpa_nb.sample.geometry import make_geometry
from hpa_nb.sample.render import render_image

IMAGES_PER_TFRECORD = 30
SMALL_SIZE_SHARE = 0.3  # the real set mixes sizes too; most images are the large size
# Bump when the generator's output changes: the cached default sample is keyed by it, so a
# cache written by an older generator is never reused (its images would not match the notebooks).
GENERATOR_VERSION = 2  # 2: labels on a subset of an image's cells (CELL_SHARE)
MARKER = "sample.json"  # marks a folder this module may overwrite

# Approximate images per class in the real train.csv (21,806 images): the sample keeps its skew.
REAL_CLASS_COUNTS = np.array(
    [8797, 1095, 2270, 1199, 1286, 2225, 660, 2112, 1224, 1106, 1061, 57, 1760, 3277, 2321, 270, 5748, 1861, 34],
    np.float64,
)
LABELS_PER_IMAGE = (1, 2, 3)
LABELS_PER_IMAGE_P = (0.5, 0.35, 0.15)
NEGATIVE_P = 0.02  # higher than real so Negative shows up without forcing in bigger samples
# The share of an image's cells that carry each class when the image does. In the competition a label is
# often carried by some cells only: a mitotic spindle by the one or two dividing cells, an aggresome or
# centrosome pattern by a few, speckles by about half; compartment stains such as the nucleoplasm or the
# ER by most. The rare cell-cycle classes sit on the fewest cells. Negative (only ever alone) is every cell.
CELL_SHARE = np.array(
    [0.85, 0.75, 0.75, 0.6, 0.5, 0.5, 0.85, 0.65, 0.6, 0.6, 0.7, 0.1, 0.4, 0.7, 0.8, 0.2, 0.8, 0.5, 1.0],
    np.float64,
)


# --- labels -------------------------------------------------------------------------------
def min_class_count(images: int) -> int:
    """How often every class is guaranteed to appear among `images` training images."""
    return min(3, max(1, images // 40))


def _draw_label_set(rng: np.random.Generator, first: int | None) -> list[int]:
    """1–3 classes drawn with the real skew; Negative only ever alone."""
    if first == NEGATIVE or (first is None and rng.random() < NEGATIVE_P):
        return [NEGATIVE]
    count = int(rng.choice(LABELS_PER_IMAGE, p=LABELS_PER_IMAGE_P))
    chosen = [] if first is None else [first]
    weights = REAL_CLASS_COUNTS.copy()
    weights[NEGATIVE] = 0.0
    weights[chosen] = 0.0
    extra = rng.choice(N_CLASSES, size=count - len(chosen), replace=False, p=weights / weights.sum())
    labels = chosen + [int(c) for c in extra]
    rng.shuffle(labels)  # real train.csv labels come in no particular order ("8|5|0")
    return labels


def draw_labels(images: int, rng: np.random.Generator, guarantee: bool = True) -> list[list[int]]:
    """Label sets for `images` images; with `guarantee`, each class appears `min_class_count` times."""
    forced: list[int] = []
    if guarantee:
        rarest_first = [int(c) for c in np.argsort(REAL_CLASS_COUNTS, kind="stable")]
        forced = (rarest_first * min_class_count(images))[:images]
    sets = [_draw_label_set(rng, forced[i] if i < len(forced) else None) for i in range(images)]
    return [sets[i] for i in rng.permutation(images)]


def _cell_labels(image_labels: list[int], cells: int, rng: np.random.Generator) -> list[list[int]]:
    """Per-cell labels: each label of the image goes to a random subset of its cells (at least one),
    ``CELL_SHARE[label]`` of them on average; a cell left without a label is a Negative cell.

    So the image label is the union of its cells' localisation labels (Negative cells add nothing,
    as in the competition, where Negative never comes with another label), and an all-Negative
    image has only Negative cells.
    """
    result: list[list[int]] = [[] for _ in range(cells)]
    for label in image_labels:
        carriers = max(1, int(rng.binomial(cells, CELL_SHARE[label])))
        for cell in rng.choice(cells, size=min(carriers, cells), replace=False):
            result[int(cell)].append(label)
    return [sorted(labels, key=image_labels.index) if labels else [NEGATIVE] for labels in result]


def _image_id(rng: np.random.Generator) -> str:
    """A uuid1-like ID such as the real ``5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0``."""
    hexes = rng.bytes(12).hex()
    return f"{hexes[:8]}-{hexes[8:12]}-11e8-{hexes[12:16]}-ac1f6b{hexes[16:22]}"


# --- files --------------------------------------------------------------------------------
def _png(array: np.ndarray, mask: bool = False) -> bytes:
    buffer = io.BytesIO()
    # Noisy microscopy barely compresses beyond Huffman coding, which is also the fastest; masks are flat, so deflate
    options = {"compress_level": 6} if mask else {"compress_level": 1, "compress_type": zlib.Z_HUFFMAN_ONLY}
    Image.fromarray(array).save(buffer, format="PNG", **options)
    return buffer.getvalue()


def _quantise(channel: np.ndarray, bit_depth: int) -> np.ndarray:
    top, dtype = (255, np.uint8) if bit_depth == 8 else (65535, np.uint16)
    return np.rint(channel * top).astype(dtype)


def _small_size(size: int) -> int:
    return max(8, int(round(size * 2 / 3 / 8)) * 8)


@dataclass
class _Plan:
    image_id: str
    labels: list[int]
    size: int
    split: str  # "train" or "test"
    index: int


def _plans(images: int, test_images: int, size: int, seed: int) -> list[_Plan]:
    rng = np.random.default_rng([seed, 0])
    ids: list[str] = []
    while len(ids) < images + test_images:
        candidate = _image_id(rng)
        if candidate not in ids:
            ids.append(candidate)
    train_labels = draw_labels(images, rng, guarantee=True)
    test_labels = draw_labels(test_images, rng, guarantee=False)
    sizes = np.where(rng.random(images + test_images) < SMALL_SIZE_SHARE, _small_size(size), size)
    plans = [_Plan(ids[i], train_labels[i], int(sizes[i]), "train", i) for i in range(images)]
    plans += [_Plan(ids[images + i], test_labels[i], int(sizes[images + i]), "test", i) for i in range(test_images)]
    return plans


def _tfrecord_name(index: int, files: int) -> str:
    return f"train-{index:03d}-of-{files:03d}.tfrec"


def _prepare(out: Path) -> None:
    """Create `out`; only a folder holding a previous sample (its marker) may be overwritten."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise FileExistsError(f"{out} is not empty and holds no {MARKER}: refusing to overwrite it")
        for name in ("train", "test", "train_tfrecords", "masks"):
            shutil.rmtree(out / name, ignore_errors=True)
    for name in ("train", "test", "train_tfrecords", "masks"):
        (out / name).mkdir(parents=True, exist_ok=True)


def _validate(images: int, size: int, bit_depth: int, test_images: int) -> None:
    if images < 1:
        raise ValueError(f"images must be at least 1, got {images}")
    if test_images < 0:
        raise ValueError(f"test_images must be at least 0, got {test_images}")
    if size < 32:
        raise ValueError(f"size must be at least 32 px, got {size}")
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")


def _records(plan: _Plan, pngs: dict[str, bytes], rng: np.random.Generator) -> list[bytes]:
    """The image's four serialized competition records, colours in a per-image shuffled order."""
    target = "|".join(str(label) for label in plan.labels)
    return [
        encode_record(f"{plan.image_id}_{COLORS[i]}", pngs[COLORS[i]], target) for i in rng.permutation(len(COLORS))
    ]


def _write_csv(path: Path, header: str, rows: list[str]) -> None:
    path.write_text("\n".join([header, *rows]) + "\n")


def write_sample(
    out: str | Path,
    images: int = 240,
    size: int = 256,
    seed: int = 0,
    bit_depth: int = 8,
    test_images: int = 16,
    progress: bool = True,
) -> Path:
    """Write an HPA-like synthetic data set in the competition layout into `out` and return it.

    Files: ``train.csv``, ``train/{ID}_{color}.png``, ``train_tfrecords/train-NNN-of-MMM.tfrec``
    (an image's four records contiguous, colour order shuffled per image), ``test/`` PNGs,
    ``sample_submission.csv``, plus ground truth for cell-level work: ``masks/{ID}.png`` (uint16
    instance ids, train and test) and ``cells.csv`` (ID, CellID, Label for train and test cells).
    Images are square, `size` px or about two thirds of it, 8- or 16-bit greyscale PNGs.
    Every class appears at least ``min_class_count(images)`` times; Negative never comes with another
    label. The same arguments give byte-identical files.
    """
    _validate(images, size, bit_depth, test_images)  # before the slow TensorFlow import: bad input answers at once

    out = Path(out)
    _prepare(out)
    plans = _plans(images, test_images, size, seed)
    per_file = math.ceil(images / max(1, math.ceil(images / IMAGES_PER_TFRECORD)))  # even files of <= 30
    files = math.ceil(images / per_file)
    train_rows, cell_rows, submission_rows = [], [], []
    records: list[bytes] = []  # the TFRecord file being filled
    bar = tqdm(total=len(plans), desc="sample", unit="img", file=sys.stderr, disable=not (progress and images >= 50))
    try:
        for plan in plans:
            rng = np.random.default_rng([seed, 1 if plan.split == "train" else 2, plan.index])
            geometry = make_geometry(plan.size, rng)
            cell_labels = _cell_labels(plan.labels, geometry.cells, rng)
            channels, _ = render_image(plan.size, cell_labels, rng, geometry)
            pngs = {color: _png(_quantise(channels[color], bit_depth)) for color in COLORS}
            for color in COLORS:
                (out / plan.split / f"{plan.image_id}_{color}.png").write_bytes(pngs[color])
            (out / "masks" / f"{plan.image_id}.png").write_bytes(_png(geometry.mask(), mask=True))
            label_text = "|".join(str(label) for label in plan.labels)
            cell_rows += [
                f"{plan.image_id},{i + 1},{'|'.join(map(str, labels))}" for i, labels in enumerate(cell_labels)
            ]
            if plan.split == "train":
                train_rows.append(f"{plan.image_id},{label_text}")
                records += _records(plan, pngs, rng)
                if plan.index % per_file == per_file - 1 or plan.index == images - 1:
                    write_tfrecord(out / "train_tfrecords" / _tfrecord_name(plan.index // per_file, files), records)
                    records = []
            else:
                submission_rows.append(f"{plan.image_id},{plan.size},{plan.size},")
            bar.update()
    finally:
        bar.close()
    _write_csv(out / "train.csv", "ID,Label", train_rows)
    _write_csv(out / "cells.csv", "ID,CellID,Label", cell_rows)
    _write_csv(out / "sample_submission.csv", "ID,ImageWidth,ImageHeight,PredictionString", submission_rows)
    spec = {"images": images, "size": size, "seed": seed, "bit_depth": bit_depth, "test_images": test_images}
    (out / MARKER).write_text(json.dumps(spec, indent=1, sort_keys=True) + "\n")
    return out
