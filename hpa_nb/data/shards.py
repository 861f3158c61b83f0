"""Compact training shards, the one owner of the ``shards/`` artifact: one uint8 record per image,
all channels resized once, about 150 MB a shard, listed by ``manifest.json``.

`write_shards` writes them (restartable: a shard is renamed into place only when whole),
`shard_layout` reads them back, and `read_manifest` checks a folder before anything is read.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import tensorflow as tf
from tqdm import tqdm

from hpa_nb.core.budget import DiskBudgetError, Probe
from hpa_nb.core.env import working_dir
from hpa_nb.core.labels import N_CLASSES, colors_of, parse_label
from hpa_nb.data import records as record_files
from hpa_nb.data.bad_input import SkipLog, first_problem, join_text, skip_log
from hpa_nb.data.competition import TFRECORD_PATTERN, load_labels, png_layout, tfrecord_layout
from hpa_nb.data.reading import (
    AUTOTUNE,
    Layout,
    as_written,
    file_records,
    file_size,
    files_at_once,
    id_predicate,
    read,
    resize,
    to_uint8,
)

logger = logging.getLogger(__name__)

SHARD_DIR = "shards"
MANIFEST = "manifest.json"
SHARD_FORMAT = "hpa_nb-shards"
SHARD_ENCODINGS = ("raw", "png")
# ~150 MB per shard streams well from local disk and GCS and keeps a rerun's lost work small.
SHARD_TARGET_BYTES = 150 * 2**20
# A manifest lists every shard's image IDs and labels (version 2), so shards from another source pair with its train.csv.
MANIFEST_VERSION = 2
# Images written before the first projection of the total against a byte budget.


def default_dir(root: str | Path | None = None) -> Path:
    """Where shards go when no folder is named: ``ROOT/shards`` (where readers of ROOT look), else the working folder's."""
    return Path(root if root is not None else working_dir()) / SHARD_DIR


def manifest_path(shard_dir: str | Path) -> Path:
    return Path(shard_dir) / MANIFEST


def is_shard_folder(folder: str | Path) -> bool:
    """Whether `folder` holds compact shards: a ``manifest.json`` of this format (other data sets have their own)."""
    try:
        return json.loads((Path(folder) / MANIFEST).read_text()).get("format") == SHARD_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_manifest(shard_dir: str | Path) -> dict:
    """The manifest of a folder of compact shards (`write_shards`)."""
    return record_files.read_listing(Path(shard_dir) / MANIFEST, SHARD_FORMAT, "compact shards")


_SHARD_FEATURES = {
    "id": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "label": tf.io.FixedLenFeature([N_CLASSES], tf.float32, default_value=[0.0] * N_CLASSES),
    "image": tf.io.FixedLenFeature([], tf.string, default_value=""),
}


def shard_layout(
    shard_dir: Path,
    manifest: dict,
    colors: tuple[str, ...],
    ids: Iterable[str] | None,
    exclude: Iterable[str] | None = None,
) -> Layout:
    """The shards of `shard_dir`, read through its `manifest`, which `choose_layout` found to hold `colors`."""
    stored = colors_of(manifest["channels"])
    size, stored_count, encoding = int(manifest["size"]), len(stored), manifest["encoding"]
    files = [str(shard_dir / entry["file"]) for entry in manifest["shards"]]
    sizes = [file_size(f) for f in files]
    wanted = id_predicate(ids, exclude)

    def element(record: tf.Tensor, path: tf.Tensor, problem: tf.Tensor) -> dict:
        features = tf.io.parse_single_example(record, _SHARD_FEATURES)  # a problem's empty record gives defaults
        image_id, image, label = features["id"], features["image"], features["label"]
        raw_ok = tf.equal(tf.strings.length(image), size * size * stored_count) | tf.constant(encoding != "raw")
        return {
            "id": image_id,
            "label": label,
            "data": image,
            "source": path,
            "problem": first_problem(
                [
                    (tf.not_equal(problem, ""), problem),
                    (tf.logical_not(raw_ok), join_text("file ", path, ": image ", image_id, ": wrong image size")),
                ]
            ),
        }

    def parse(items: tf.data.Dataset, deterministic: bool, image_size: int) -> tf.data.Dataset:
        records = items.interleave(
            file_records,
            cycle_length=files_at_once(len(files), deterministic),
            num_parallel_calls=AUTOTUNE,
            deterministic=deterministic,
        )
        elements = records.map(element, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
        return elements.filter(lambda e: tf.not_equal(e["problem"], "") | wanted(e["id"]))

    def decode_raw(data: tf.Tensor, image_size: int) -> tf.Tensor:
        image = tf.reshape(tf.io.decode_raw(data, tf.uint8), [size, size, stored_count])
        return resize(image[..., : len(colors)], image_size)

    def decode_png(data: tf.Tensor, image_size: int) -> tf.Tensor:
        image = tf.io.decode_png(data, channels=stored_count)
        return resize(image[..., : len(colors)], image_size)

    decoders = {"raw": decode_raw, "png": decode_png}
    return Layout(
        "shards",
        f"compact shards {shard_dir} ({manifest['count']} images, {size} px, {manifest['channels']}, {encoding})",
        lambda: tf.data.Dataset.from_tensor_slices((files, tf.constant(sizes, tf.int64))),
        len(files),
        parse,
        decoders[encoding],
        encoding != "raw",
    )


def pair(shard_dir: Path, manifest: dict, frame: pd.DataFrame, source: str | Path) -> pd.DataFrame:
    """The rows of `frame` (``train.csv`` of `source`, columns ID and Label) that the shards hold,
    after checking that the two belong together.

    Stops with one line when the shards are incomplete (a prepare run that hit its deadline), hold
    an image `frame` lacks, disagree with it on a label, or lack more images than they skipped as
    bad when they were written; images skipped as bad are left out with a warning line.
    """
    where = Path(shard_dir) / MANIFEST
    entries = manifest["shards"]
    if any("ids" not in entry for entry in entries):
        raise ValueError(f"{where} lists no image IDs (written by an older hpa-nb): write the shards again")
    if not manifest.get("complete", True):
        raise ValueError(
            f"{where}: the shards are incomplete ({manifest['count']} images; their prepare run "
            "stopped at its deadline): run 00_prepare again with RESUME_FROM to finish them"
        )
    held = {image_id: label for entry in entries for image_id, label in zip(entry["ids"], entry["labels"])}
    truth = {image_id: _label_text(parse_label(text, image_id)) for image_id, text in zip(frame["ID"], frame["Label"])}
    extra = sorted(set(held) - set(truth))
    if extra:
        raise ValueError(
            f"{where}: the shards hold {len(extra)} images that {source}/train.csv lacks (e.g. "
            f"{extra[0]}): they were written from other data"
        )
    for image_id, label in held.items():
        if truth[image_id] != label:
            raise ValueError(
                f"{where}: image {image_id} has label '{label}' in the shards but "
                f"'{truth[image_id]}' in {source}/train.csv: they were written from other data"
            )
    missing = sorted(set(truth) - set(held))
    if len(missing) > manifest.get("skipped", 0):
        raise ValueError(
            f"{where}: {len(missing)} of the {len(truth)} images in {source}/train.csv are not in "
            f"the shards (e.g. {missing[0]}): write the shards again from {source}"
        )
    if missing:
        logger.warning(
            f"warning: {len(missing)} images of train.csv were skipped as bad when the shards were written "
            f"(e.g. {missing[0]}); training leaves them out"
        )
    return frame[frame["ID"].isin(held)].reset_index(drop=True)


SHARD_GLOB = "shard-*.tfrec"


def adopt_shards(previous: str | Path, out: str | Path) -> int:
    """Copy the finished shards of an earlier, stopped run (such as the attached output of the previous
    prepare kernel) into `out`, so that `write_shards` goes on from them (`record_files.adopt`)."""
    return record_files.adopt(previous, out, SHARD_GLOB)


def _label_text(label: np.ndarray) -> str:
    return "|".join(str(index) for index in np.flatnonzero(label > 0.5))


def _shard_example(image: np.ndarray, label: np.ndarray, image_id: bytes, encoding: str) -> bytes:
    data = image.tobytes() if encoding == "raw" else tf.io.encode_png(image).numpy()
    feature = {
        "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_id])),
        "label": tf.train.Feature(float_list=tf.train.FloatList(value=label.tolist())),
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


ShardBudgetError = DiskBudgetError  # the shards would not fit in the disk budget (/kaggle/working holds 20 GB)


def _source_layout(
    src: Path, colors: tuple[str, ...], log: SkipLog | None, exclude: list[str]
) -> tuple[Layout, int | None]:
    """The layout to shard from, and how many images it holds in all (None when unknown).

    PNGs first: the image list is known up front (a true progress total) and only the wanted
    channels are read; the competition TFRecords also carry the unwanted ones."""
    if (src / "train.csv").is_file() and (src / "train").is_dir():
        layout = png_layout(src, colors, None, log, exclude=exclude)
        return layout, layout.item_count + len(exclude)
    records = sorted(tf.io.gfile.glob(str(src / "train_tfrecords" / TFRECORD_PATTERN)))
    if not records:
        raise FileNotFoundError(f"{src} has neither train.csv with train/ PNGs nor train_tfrecords/{TFRECORD_PATTERN}")
    expected = len(load_labels(src)) if (src / "train.csv").is_file() else None
    return tfrecord_layout(records, colors, None, exclude), expected


@as_written
def write_shards(
    src: str | Path,
    out: str | Path | None = None,
    size: int = 512,
    channels: str = "rgby",
    encoding: str = "raw",
    images_per_shard: int | None = None,
    skip_bad: bool | SkipLog = False,
    progress: bool = True,
    max_gb: float | None = None,
    deadline: float | None = None,
) -> dict:
    """Write compact training shards: one record per image, all channels resized once, uint8.

    `out` defaults to ``src/shards`` (where `open_dataset` looks). Shards hold about 150 MB
    each. Restartable: a shard is written under a temporary name and renamed when complete,
    a rerun skips finished shards, and the manifest (written last) lists only finished ones.
    ``encoding="png"`` trades read speed for disk space (raw rgby at 512 px is 1 MiB an image).

    After the first images (`hpa_nb.core.budget.PROBE_IMAGES`) the whole job's time and size are projected
    from what they cost (one line). With `max_gb`, the size is projected again at every shard, and
    `ShardBudgetError` stops the run as soon as the projection is over budget. With `deadline` (a
    ``time.time()`` value), the run stops after the first shard that ends past it and writes a manifest marked incomplete, so a
    time-limited session ends cleanly and its shards can be adopted (`adopt_shards`) by the next.
    Returns the manifest.
    """

    if encoding not in SHARD_ENCODINGS:
        raise ValueError(f"encoding must be one of {SHARD_ENCODINGS}, not {encoding!r}")
    if size < 8:
        raise ValueError(f"shard size {size} px is too small")
    colors = colors_of(channels)
    src = Path(src)
    out = Path(out) if out is not None else default_dir(src)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"size": size, "channels": channels, "encoding": encoding}
    finished = record_files.finished_files(out, SHARD_GLOB, settings, {"ids", "labels", "bytes"})
    done_ids = [image_id for record in finished.values() for image_id in record["ids"]]
    log = skip_log(skip_bad)
    layout, expected = _source_layout(src, colors, log, done_ids)
    logger.info(f"shard: reading {layout.description}; {len(done_ids)} images already in {len(finished)} shards")
    per_shard = images_per_shard or max(1, SHARD_TARGET_BYTES // (size * size * len(colors)))
    images = read(layout, size, channels, True, True, log)
    images = images.map(
        lambda image, label, image_id: (to_uint8(image), label, image_id), num_parallel_calls=AUTOTUNE
    ).prefetch(AUTOTUNE)
    probe = Probe(
        f"shards of {src}",
        expected,
        len(done_ids),
        None if deadline is None else (deadline - time.time()) / 3600,
        max_gb,
    )
    bar = tqdm(
        total=None if expected is None else expected - len(done_ids), unit="img", desc="shard", disable=not progress
    )
    with record_files.RollingWriter(
        out, "shard", settings, finished, probe, per_shard, SHARD_TARGET_BYTES, deadline
    ) as writer:
        try:
            for image, label, image_id in images.as_numpy_iterator():
                bar.update(1)
                entry = {"ids": image_id.decode(), "labels": _label_text(label)}
                if not writer.add([_shard_example(image, label, image_id, encoding)], entry):
                    break
        finally:
            bar.close()
    manifest = _manifest(
        finished, settings, src, complete=not writer.stopped_at_deadline, skipped=log.count if log else 0
    )
    return record_files.finish(
        manifest_path(out),
        manifest,
        f"shard: stopped at the deadline with {manifest['count']} images in {len(finished)} "
        "shards; run again (adopting these shards) to go on",
    )


def _manifest(finished: dict[str, dict], settings: dict, src: Path, complete: bool, skipped: int) -> dict:
    shards = [
        {
            "file": name,
            "count": len(record["ids"]),
            "bytes": record["bytes"],
            "ids": record["ids"],
            "labels": record["labels"],
        }
        for name, record in sorted(finished.items())
    ]
    count = sum(entry["count"] for entry in shards)
    total_bytes = sum(entry["bytes"] for entry in shards)
    return {
        "format": SHARD_FORMAT,
        "version": MANIFEST_VERSION,
        **settings,
        "count": count,
        "bytes": total_bytes,
        "bytes_per_image": round(total_bytes / count) if count else None,
        "complete": complete,
        "shards": shards,
        "source": str(src),
        "skipped": skipped,
    }
