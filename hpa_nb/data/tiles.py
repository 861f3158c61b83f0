"""Cell tiles, the one owner of the ``tiles/`` artifact: one record per cell of every training image,
listed by ``tiles.json``.

A tile is what the cell scorer shows a cell model (`hpa_nb.cells.scoring.cell_crops`, ``ScoreRule(crop="tight")``):
the cell's bounding box with every pixel outside the cell set to 0 (background and neighbouring
cells alike), padded with zeros to a centred square so the cell keeps its aspect ratio, and resized
to ``size`` px with the training pipeline's kernel, stored as uint8. So training and submission see
cells the same way. Each record also holds the image ID, the cell ID, the image's label (the weak
target of every one of its cells), the cell's box in the image, its share of the image's area and
whether it touches the image's border.

`write_tiles` writes them (restartable like the shards: a file is renamed into place only when
whole), `read_tiles` reads them back through the data layer's shard reader, and `tile_keys` names
the tiles of a set of images (a split is made over images, so no cell of a validation image is
trained on).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import tensorflow as tf
from scipy import ndimage
from tqdm import tqdm

from hpa_nb.core.budget import Probe
from hpa_nb.core.env import working_dir
from hpa_nb.core.labels import N_CLASSES, colors_of, parse_label
from hpa_nb.core.workers import Workers
from hpa_nb.data import records
from hpa_nb.data.bad_input import SkipLog, skip_log
from hpa_nb.data.competition import load_labels
from hpa_nb.data.crops import cell_crops, cell_extent, cell_ids_of
from hpa_nb.data.reading import as_written, read
from hpa_nb.data.shards import shard_layout
from hpa_nb.segmentation.backends import on_accelerator, segment
from hpa_nb.segmentation.classical import ClassicalSettings
from hpa_nb.segmentation.images import colors_needed, read_channels, read_mask, stack_channels

logger = logging.getLogger(__name__)

TILE_DIR = "tiles"
ENCODINGS = ("raw", "png")
MANIFEST = "tiles.json"  # not the shards' manifest.json: a search for shards never finds tiles
TILE_FORMAT = "hpa_nb-tiles"
TILE_GLOB = "tiles-*.tfrec"
SEGMENTATIONS = ("classical", "hpacellseg", "masks")  # masks: the sample's true cells (masks/{ID}.png)
TARGET_BYTES = 150 * 2**20  # as the shards: a file is committed after the image that passes this


def default_dir(root: str | Path | None = None) -> Path:
    """Where tiles go when no folder is named: ``ROOT/tiles`` (where a cell run of ROOT looks), else the working folder's."""
    return Path(root if root is not None else working_dir()) / TILE_DIR


def manifest_path(tile_dir: str | Path) -> Path:
    return Path(tile_dir) / MANIFEST


def tile_key(image_id: str, cell_id: int) -> str:
    """A tile's record ID: the image ID and the cell ID (image IDs hold no underscore)."""
    return f"{image_id}_{int(cell_id)}"


@dataclass
class ImageTiles:
    """The tiles of one image: ``crops[i]`` (uint8 ``[S, S, C]``) is cell ``cell_ids[i]``."""

    image_id: str
    cell_ids: np.ndarray  # int64 [N]
    crops: np.ndarray  # uint8 [N, S, S, C]
    boxes: np.ndarray  # int64 [N, 4]: top, left, bottom, right (exclusive) in the image's pixels
    area_fractions: np.ndarray  # float32 [N]: cell pixels / image pixels
    border: np.ndarray  # bool [N]: the cell touches the image's edge


def cut_tiles(image: np.ndarray, mask: np.ndarray, image_id: str, size: int) -> ImageTiles:
    """The tiles of one image (``[H, W, C]`` float32 on the 0–255 scale) and its instance mask."""

    ids, crops = cell_crops(image, mask, size, cell_ids_of(mask))
    boxes = ndimage.find_objects(mask.astype(np.int32))
    box_rows = np.array(
        [[b[0].start, b[1].start, b[0].stop, b[1].stop] for b in (boxes[i - 1] for i in ids)], np.int64
    ).reshape(-1, 4)
    areas, border = cell_extent(mask, ids)
    uint8 = np.clip(np.rint(crops), 0, 255).astype(np.uint8)
    return ImageTiles(image_id, ids, uint8, box_rows, (areas / mask.size).astype(np.float32), border)


def _example(tiles: ImageTiles, row: int, label: np.ndarray, encoding: str = "raw") -> bytes:
    def feature(kind, values):
        lists = {"bytes": tf.train.BytesList, "float": tf.train.FloatList, "int64": tf.train.Int64List}
        return tf.train.Feature(**{f"{kind}_list": lists[kind](value=values)})

    cell_id = int(tiles.cell_ids[row])
    feature_map = {
        "id": feature("bytes", [tile_key(tiles.image_id, cell_id).encode()]),
        "image_id": feature("bytes", [tiles.image_id.encode()]),
        "cell_id": feature("int64", [cell_id]),
        "label": feature("float", label.tolist()),
        "image": feature(
            "bytes", [tiles.crops[row].tobytes() if encoding == "raw" else tf.io.encode_png(tiles.crops[row]).numpy()]
        ),
        "box": feature("int64", tiles.boxes[row].tolist()),
        "area_fraction": feature("float", [float(tiles.area_fractions[row])]),
        "border": feature("int64", [int(tiles.border[row])]),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature_map)).SerializeToString(deterministic=True)


def _mask(
    src: Path, image_id: str, pixels: dict, segmentation: str, settings: ClassicalSettings, method_options: dict
) -> np.ndarray:
    if segmentation == "masks":
        mask = read_mask(src, image_id)
        if mask.shape != pixels["red"].shape:
            raise ValueError(
                f"image {image_id}: mask {src / 'masks' / (image_id + '.png')} is "
                f"{mask.shape[1]}×{mask.shape[0]} px, the image {pixels['red'].shape[1]}×"
                f"{pixels['red'].shape[0]} px"
            )
        return mask
    return segment(pixels["red"], pixels["blue"], pixels["yellow"], segmentation, settings, **method_options)


def _image_tiles(
    src: Path,
    image_id: str,
    size: int,
    channels: str,
    segmentation: str,
    settings: ClassicalSettings,
    method_options: dict,
) -> ImageTiles:
    """Read, segment and cut one training image; bad input raises ValueError naming the file or ID."""
    folder = src / "train"
    colors = colors_needed(channels)
    try:
        pixels = read_channels(folder, image_id, colors)
    except FileNotFoundError:
        raise
    except OSError as exc:  # PIL: not a PNG, truncated
        raise ValueError(f"image {image_id}: {' '.join(str(exc).split())}") from None
    mask = _mask(src, image_id, pixels, segmentation, settings, method_options)
    return cut_tiles(stack_channels(pixels, channels), mask, image_id, size)


def _image_record(
    src: Path,
    size: int,
    channels: str,
    segmentation: str,
    settings: ClassicalSettings,
    method_options: dict,
    encoding: str,
    item: tuple[str, str],
) -> tuple[list[bytes], dict] | Exception:
    """One image's tile records and listing entry (in a worker process); a bad image's error, returned to be raised
    or counted where one process would have."""
    image_id, label_text = item
    try:
        tiles = _image_tiles(src, image_id, size, channels, segmentation, settings, method_options)
    except (ValueError, FileNotFoundError) as exc:
        return exc
    label = parse_label(label_text, image_id)
    examples = [_example(tiles, row, label, encoding) for row in range(len(tiles.cell_ids))]
    return examples, {"ids": image_id, "labels": label_text, "cell_ids": tiles.cell_ids.tolist()}


def write_tiles(
    src: str | Path,
    out: str | Path | None = None,
    size: int = 128,
    channels: str = "rgby",
    segmentation: str = "classical",
    images_per_file: int | None = None,
    skip_bad: bool | SkipLog = False,
    progress: bool = True,
    deadline: float | None = None,
    max_gb: float | None = None,
    encoding: str = "raw",
    settings: ClassicalSettings = ClassicalSettings(),
    workers: int | None = None,
    **method_options,
) -> dict:
    """Write one record per cell of every image in ``src/train.csv`` (PNGs in ``src/train/``).

    `out` defaults to ``src/tiles``. Cells come from `segmentation` (`SEGMENTATIONS`; ``"masks"``
    reads the sample's true cells). Restartable: a file of whole images is written under a
    temporary name and renamed when complete (about 150 MB, or `images_per_file` images), a rerun
    skips the images of finished files, and ``tiles.json`` (written last) lists only finished
    ones. A missing or unreadable image stops the run with one line naming it, or is skipped with
    a warning under `skip_bad`. With `deadline` (a ``time.time()`` value) the run stops after the
    first file that ends past it and marks the listing incomplete. After the first images the whole job's
    time and size are projected from what they cost (`hpa_nb.core.budget.Probe`, one line); with `max_gb` the run
    stops before writing more as soon as the projected size passes it. ``encoding="png"`` stores each tile
    PNG-compressed (the background outside the cell is 0, so it compresses well); "raw" reads fastest. Returns
    the listing.

    Images are read, segmented, cut and encoded by `workers` processes (default: every core this process may use;
    HPA-Cell-Segmentation on a GPU segments in this process, its one place on the accelerator), and written in
    the listing's order: the files are byte for byte those of one worker.
    """

    if segmentation not in SEGMENTATIONS:
        raise ValueError(f"segmentation {segmentation!r} is not one of {SEGMENTATIONS}")
    if size < 8:
        raise ValueError(f"tile size {size} px is too small")
    colors_of(channels)
    src = Path(src)
    out = Path(out) if out is not None else default_dir(src)
    log = skip_log(skip_bad)
    frame = load_labels(src, log if log is not None else False)
    out.mkdir(parents=True, exist_ok=True)
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, not {encoding!r}")
    file_settings = {"size": size, "channels": channels, "encoding": encoding, "segmentation": segmentation}
    finished = records.finished_files(out, TILE_GLOB, file_settings, {"ids", "labels", "cell_ids", "bytes"})
    done = {image_id for record in finished.values() for image_id in record["ids"]}
    todo = [(i, t) for i, t in zip(frame["ID"], frame["Label"]) if i not in done]
    logger.info(
        f"tiles: {len(todo)} images of {src / 'train.csv'} to cut ({segmentation} cells, {size} px, {channels}); "
        f"{len(done)} already in {len(finished)} files"
    )
    if on_accelerator(segmentation, method_options):
        workers = 1
    work = functools.partial(_image_record, src, size, channels, segmentation, settings, method_options, encoding)
    with Workers(workers, preload=[__name__]) as pool:
        probe = Probe(
            f"tiles of {src} ({pool.count} worker{'s' if pool.count > 1 else ''})",
            len(frame),
            len(done),
            None if deadline is None else (deadline - time.time()) / 3600,
            max_gb,
        )
        bar = tqdm(total=len(todo), unit="img", desc="tiles", disable=not progress, file=sys.stderr)
        with records.RollingWriter(
            out, "tiles", file_settings, finished, probe, images_per_file, TARGET_BYTES, deadline
        ) as writer:
            try:
                for outcome in pool.map(work, todo, describe=lambda item: f"image {item[0]}"):
                    bar.update(1)
                    if isinstance(outcome, Exception):
                        if log is None:
                            raise outcome
                        log.add(str(outcome))
                        continue
                    if not writer.add(*outcome):
                        break
            finally:
                bar.close()
    manifest = _manifest(finished, file_settings, src, not writer.stopped_at_deadline, log.count if log else 0)
    return records.finish(
        manifest_path(out),
        manifest,
        f"tiles: stopped at the deadline with {manifest['images']} images in {len(finished)} files; "
        "run again (adopting these files, `adopt_tiles`) to go on",
    )


def _manifest(finished: dict[str, dict], settings: dict, src: Path, complete: bool, skipped: int) -> dict:
    files = [
        {
            "file": name,
            "images": len(record["ids"]),
            "count": sum(map(len, record["cell_ids"])),
            "bytes": record["bytes"],
            "ids": record["ids"],
            "labels": record["labels"],
            "cell_ids": record["cell_ids"],
        }
        for name, record in sorted(finished.items())
    ]
    return {
        "format": TILE_FORMAT,
        "version": 1,
        **settings,
        "images": sum(f["images"] for f in files),
        "count": sum(f["count"] for f in files),
        "bytes": sum(f["bytes"] for f in files),
        "complete": complete,
        "skipped": skipped,
        "source": str(src),
        "files": files,
    }


def adopt_tiles(previous: str | Path, out: str | Path) -> int:
    """Copy the finished files of an earlier, stopped run into `out` (`record_files.adopt`)."""
    return records.adopt(previous, out, TILE_GLOB)


def read_manifest(tile_dir: str | Path) -> dict:
    """The listing of a finished folder of tiles (`write_tiles`)."""
    return records.read_listing(Path(tile_dir) / MANIFEST, TILE_FORMAT, "cell tiles (python -m hpa_nb tiles)")


def is_tile_folder(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def tile_keys(manifest: dict, image_ids: Iterable[str] | None = None) -> list[str]:
    """The record IDs of the tiles of `image_ids` (all images when None), in listing order."""
    wanted = None if image_ids is None else set(image_ids)
    return [
        tile_key(image_id, cell_id)
        for entry in manifest["files"]
        for image_id, cells in zip(entry["ids"], entry["cell_ids"])
        if wanted is None or image_id in wanted
        for cell_id in cells
    ]


def image_labels(manifest: dict) -> dict[str, str]:
    """``{image ID: label text}`` of every image the tiles hold."""
    return {i: label for entry in manifest["files"] for i, label in zip(entry["ids"], entry["labels"])}


def tile_layout(tile_dir: Path, manifest: dict, colors: tuple[str, ...], keys: Iterable[str] | None):
    """The tiles as a `hpa_nb.data.reading.Layout` (the shard reader: a tile record holds the shard record's
    ``id``, ``label`` and raw ``image``), for `hpa_nb.data.pipeline` to read, keeping the tiles named by `keys`."""
    if colors_of(manifest["channels"])[: len(colors)] != colors:
        raise ValueError(f"{Path(tile_dir) / MANIFEST}: the tiles hold {manifest['channels']}, not {'+'.join(colors)}")
    as_shards = {**manifest, "shards": manifest["files"]}
    layout = shard_layout(Path(tile_dir), as_shards, colors, keys)
    return dataclasses.replace(
        layout,
        kind="tiles",
        description=(
            f"cell tiles {tile_dir} ({manifest['count']} cells of {manifest['images']} images, {manifest['size']} px, "
            f"{manifest['channels']}, {manifest['segmentation']} cells)"
        ),
    )


def read_tiles(
    tile_dir: str | Path,
    image_size: int | None = None,
    channels: str | None = None,
    image_ids: Iterable[str] | None = None,
    with_id: bool = True,
):
    """The tiles as a tf.data dataset of ``(image, label, tile key)`` (image float32 on the 0–255 scale
    at `image_size`, default the tiles' size), keeping the cells of `image_ids` (all when None)."""
    manifest = read_manifest(tile_dir)
    channels = channels or manifest["channels"]
    keys = None if image_ids is None else tile_keys(manifest, image_ids)
    layout = tile_layout(Path(tile_dir), manifest, colors_of(channels), keys)
    return read(layout, image_size or int(manifest["size"]), channels, with_id, True, None)


@as_written
def load_tiles(tile_dir: str | Path, count: int | None = None, image_ids: Iterable[str] | None = None):
    """The first `count` tiles (of `image_ids`, all when None) as numpy: (uint8 crops ``[N, S, S, C]``, a
    pandas DataFrame with each tile's key, image ID, cell ID, label text, box, area fraction and border flag)."""

    manifest = read_manifest(tile_dir)
    size, depth = int(manifest["size"]), len(manifest["channels"])
    spec = {
        "id": tf.io.FixedLenFeature([], tf.string),
        "image_id": tf.io.FixedLenFeature([], tf.string),
        "cell_id": tf.io.FixedLenFeature([], tf.int64),
        "label": tf.io.FixedLenFeature([N_CLASSES], tf.float32),
        "image": tf.io.FixedLenFeature([], tf.string),
        "box": tf.io.FixedLenFeature([4], tf.int64),
        "area_fraction": tf.io.FixedLenFeature([], tf.float32),
        "border": tf.io.FixedLenFeature([], tf.int64),
    }
    files = [str(Path(tile_dir) / entry["file"]) for entry in manifest["files"]]
    wanted = None if image_ids is None else set(image_ids)
    crops, rows = [], []
    for record in tf.data.TFRecordDataset(files).map(lambda r: tf.io.parse_single_example(r, spec)).as_numpy_iterator():
        if wanted is not None and record["image_id"].decode() not in wanted:
            continue
        crops.append(
            np.frombuffer(record["image"], np.uint8).reshape(size, size, depth)
            if manifest["encoding"] == "raw"
            else tf.io.decode_png(record["image"], channels=depth).numpy()
        )
        rows.append(
            {
                "key": record["id"].decode(),
                "image_id": record["image_id"].decode(),
                "cell_id": int(record["cell_id"]),
                "label": "|".join(map(str, np.flatnonzero(record["label"]))),
                "box": tuple(int(v) for v in record["box"]),
                "area_fraction": float(record["area_fraction"]),
                "border": bool(record["border"]),
            }
        )
        if count is not None and len(rows) == count:
            break
    return (np.stack(crops) if crops else np.zeros((0, size, size, depth), np.uint8)), pd.DataFrame(rows)
