"""Reading HPA images correctly and fast: competition TFRecords, PNG folders and compact shards.

Every reader yields ``(image, label)`` or ``(image, label, id)``: ``image`` float32 ``[S, S, C]``
on the 0–255 scale with channels red, green, blue (+ yellow for ``"rgby"``), ``label`` a float32
multi-hot ``[19]``, ``id`` a tf.string. An image's four competition records are brought together
by ID and colour, never by position, and every record is decoded once. Bad input (a truncated
file, a corrupt PNG, mixed or missing colours, a bad label) raises an error naming the file and
the ID, or, with ``skip_bad=True``, skips the image and says so on stderr.
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import tensorflow as tf

from hpa_nb.files import TEMPORARY_GLOB, temporary_path, write_text
from hpa_nb.labels import COLORS, N_CLASSES, colors_of, label_matrix, parse_label

PNG_SUFFIX = ".png"
TFRECORD_PATTERN = "*.tfrec"
SHARD_DIR = "shards"
MANIFEST = "manifest.json"
SHARD_FORMAT = "hpa_nb-shards"
SHARD_ENCODINGS = ("raw", "png")
# ~150 MB per shard streams well from local disk and GCS and keeps a rerun's lost work small.
SHARD_TARGET_BYTES = 150 * 2**20
# A TFRecord on disk: 8-byte length, 4-byte length CRC, payload, 4-byte payload CRC.
TFRECORD_OVERHEAD = 16
# A fixed number of files read at once, so that a deterministic order is the same on every machine.
FILE_CYCLE = 8
SHUFFLE_BUFFER = 256
# 65535 / 255: a 16-bit value on the 0–255 scale.
UINT16_TO_UINT8 = 257.0
AUTOTUNE = tf.data.AUTOTUNE


class SkipLog:
    """Counts images skipped as bad input and prints a warning line for each."""

    def __init__(self, echo: bool = True) -> None:
        self.problems: list[str] = []
        self.echo = echo

    @property
    def count(self) -> int:
        return len(self.problems)

    def add(self, problem: str) -> None:
        self.problems.append(problem)
        if self.echo:
            print(f"warning: skipped bad input #{self.count}: {problem}", file=sys.stderr)

    def _add_tensor(self, problem: tf.Tensor) -> tf.Tensor:
        self.add(problem.numpy().decode("utf-8", "replace"))
        return tf.constant(False)

    def keep(self, problem: tf.Tensor) -> tf.Tensor:
        """A tf.data filter predicate: True when `problem` is empty, else log it and drop."""
        return tf.cond(tf.equal(problem, ""), lambda: tf.constant(True),
                       lambda: tf.py_function(self._add_tensor, [problem], tf.bool))


def _skip_log(skip_bad: bool | SkipLog) -> SkipLog | None:
    if isinstance(skip_bad, SkipLog):
        return skip_bad
    return SkipLog() if skip_bad else None


# Node markers come as "[[{{node Assert}}]]", "[[IteratorGetNext]]" (Keras fit) or "[[node X (defined at ...) ]]".
_TF_NOISE = (re.compile(r"\{\{function_node [^}]*\}\}"), re.compile(r"\[\[[^\[\]]*\]\]"),
             re.compile(r"\[Op:[^\]]*\]( name: \S*)?"), re.compile(r"^.*assertion failed:\s*", re.S))


def error_message(exc: BaseException) -> str:
    """One clean line from a TensorFlow error: our own message without TensorFlow's node and op noise."""
    text = getattr(exc, "message", None) or str(exc)
    for pattern in _TF_NOISE:
        text = pattern.sub(" ", text)
    text = " ".join(text.split())
    if text.startswith("[") and text.endswith("]"):  # tf.debugging.Assert wraps its data in brackets, escaped
        text = text[1:-1].strip().replace("\\'", "'").replace('\\"', '"').replace("\\\\", "\\")
    return text or type(exc).__name__


# --- labels -------------------------------------------------------------------------------
def load_labels(root: str | Path, skip_bad: bool | SkipLog = False) -> pd.DataFrame:
    """``root/train.csv`` as a DataFrame [ID, Label], every label validated.

    A bad label raises ``ValueError`` naming the ID (or is skipped with ``skip_bad``); a
    repeated ID is always an error.
    """
    path = Path(root) / "train.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"ID", "Label"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path} lacks column(s) {sorted(missing)}")
    repeated = frame["ID"][frame["ID"].duplicated()]
    if len(repeated):
        raise ValueError(f"{path}: image {repeated.iloc[0]} is listed more than once")
    log = _skip_log(skip_bad)
    keep = []
    for image_id, text in zip(frame["ID"], frame["Label"]):
        try:
            parse_label(text, image_id)
            keep.append(True)
        except ValueError as exc:
            if log is None:
                raise ValueError(f"{path}: {exc}") from None
            log.add(f"{path}: {exc}")
            keep.append(False)
    return frame.loc[keep, ["ID", "Label"]].reset_index(drop=True)


def _label_from_text(text: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Graph-side `parse_label`: (multi-hot [19], whether the text was a valid label)."""
    well_formed = tf.strings.regex_full_match(text, r"\s*\d{1,3}(\|\d{1,3})*\s*")
    safe = tf.where(well_formed, tf.strings.strip(text), "0")
    indices = tf.strings.to_number(tf.strings.split(safe, "|"), tf.int32)
    in_range = tf.reduce_all((indices >= 0) & (indices < N_CLASSES))
    label = tf.reduce_max(tf.one_hot(indices, N_CLASSES, dtype=tf.float32), axis=0)
    return label, well_formed & in_range


# --- image IDs wanted -----------------------------------------------------------------------
def _id_predicate(ids: Iterable[str] | None, exclude: Iterable[str] | None = None) -> Callable[[tf.Tensor], tf.Tensor]:
    """A graph predicate on an image ID: in `ids` (all when None) and not in `exclude`."""

    def table(values: list[str]) -> tf.lookup.StaticHashTable | None:
        if not values:
            return None
        keys = tf.constant(values, tf.string)
        return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, tf.ones_like(keys, tf.int32)), 0)

    wanted_list = None if ids is None else sorted(set(map(str, ids)))
    wanted = None if wanted_list is None else table(wanted_list)
    unwanted = table(sorted(set(map(str, exclude or ()))))

    def predicate(image_id: tf.Tensor) -> tf.Tensor:
        keep = tf.constant(wanted_list != [])
        if wanted is not None:
            keep = keep & tf.equal(wanted.lookup(image_id), 1)
        if unwanted is not None:
            keep = keep & tf.equal(unwanted.lookup(image_id), 0)
        return keep

    return predicate


def _first_problem(checks: Sequence[tuple[tf.Tensor, tf.Tensor]]) -> tf.Tensor:
    """The message of the first failed check, or "" when all pass."""
    problem = tf.constant("")
    for failed, message in reversed(checks):
        problem = tf.where(failed, message, problem)
    return problem


def _join(*parts: object) -> tf.Tensor:
    """Concatenate strings, string tensors and numbers (tensors or not) into one string tensor."""
    def text(part: object) -> object:
        if isinstance(part, tf.Tensor):
            return part if part.dtype == tf.string else tf.strings.as_string(part)
        return str(part)

    return tf.strings.join([text(part) for part in parts])


# --- competition TFRecords ------------------------------------------------------------------
def _file_size(path: str) -> int:
    try:
        return int(tf.io.gfile.stat(path).length)
    except tf.errors.NotFoundError:
        raise FileNotFoundError(f"TFRecord file {path} not found") from None


def _file_records(path: tf.Tensor, size: tf.Tensor) -> tf.data.Dataset:
    """One file's records as ``(record, path, "")``, plus ``("", path, problem)`` when the file is not read to its end.

    A truncated or corrupt file makes TFRecordDataset raise an error that names no file; reading
    with ``ignore_errors`` and comparing the bytes read with the file size names it instead.
    """
    records = tf.data.TFRecordDataset(path).ignore_errors().map(lambda record: (record, tf.constant(False)))
    end = tf.data.Dataset.from_tensors((tf.constant(""), tf.constant(True)))

    def count_bytes(total: tf.Tensor, element: tuple[tf.Tensor, tf.Tensor]):
        record, is_end = element
        total = total + tf.where(is_end, tf.constant(0, tf.int64),
                                 tf.cast(tf.strings.length(record), tf.int64) + TFRECORD_OVERHEAD)
        problem = tf.where(is_end & tf.not_equal(total, size),
                           _join("file ", path, ": truncated or corrupt after byte ", total, " of ", size), "")
        return total, (record, is_end, problem)

    stream = records.concatenate(end).scan(tf.constant(0, tf.int64), count_bytes)
    stream = stream.filter(lambda record, is_end, problem: tf.logical_not(is_end) | tf.not_equal(problem, ""))
    return stream.map(lambda record, is_end, problem: (record, path, problem))


_COMPETITION_FEATURES = {name: tf.io.FixedLenFeature([], tf.string, default_value="")
                         for name in ("image", "image_name", "target")}


def _image_records(files: tf.data.Dataset, cycle: int, deterministic: bool,
                   wanted: Callable[[tf.Tensor], tf.Tensor]) -> tf.data.Dataset:
    """Competition records brought together by image, whatever their order: ``(records [k], files [k], problem)``.

    Records are read one at a time from `cycle` files at once and grouped by image ID, so an
    image's four records may sit anywhere: interleaved with other images', colour by colour, or
    in two files. A group leaves as soon as its fourth record arrives; memory holds only the
    records of images still incomplete, at most those of the `cycle` files being read (colour-
    major files are the worst case: each file whole). A group still incomplete when the files end
    comes out short, for `_competition_element` to report. Records of unwanted images are dropped
    before grouping; a file's problem (truncated, corrupt) travels alone.
    """
    records = files.interleave(_file_records, cycle_length=cycle, num_parallel_calls=AUTOTUNE,
                               deterministic=deterministic)

    def image_of(record: tf.Tensor) -> tf.Tensor:
        name = tf.io.parse_single_example(record, {"image_name": _COMPETITION_FEATURES["image_name"]})["image_name"]
        return tf.strings.regex_replace(name, r"_[^_]*$", "")

    # Each record is parsed for its image once; the filter and the grouping key share the result.
    records = records.map(lambda record, path, problem: (record, path, problem, image_of(record)))
    records = records.filter(lambda record, path, problem, image: tf.not_equal(problem, "") | wanted(image))

    def key(record: tf.Tensor, path: tf.Tensor, problem: tf.Tensor, image: tf.Tensor) -> tf.Tensor:
        return tf.where(tf.not_equal(problem, ""), tf.constant(-1, tf.int64),
                        tf.strings.to_hash_bucket_fast(image, 2**62))

    groups = records.group_by_window(
        key_func=key, reduce_func=lambda _, window: window.batch(len(COLORS)),
        window_size_func=lambda group: tf.where(group < 0, tf.constant(1, tf.int64), len(COLORS)))
    return groups.map(lambda records, paths, problems, images: (records, paths, problems))


def _competition_element(records: tf.Tensor, paths: tf.Tensor, problems: tf.Tensor,
                         colors: tuple[str, ...]) -> dict:
    """Check one image's group of records (from `_image_records`) and order its PNGs by colour (no decoding here)."""
    features = tf.io.parse_example(records, _COMPETITION_FEATURES)
    names = features["image_name"]
    ids = tf.strings.regex_replace(names, r"_[^_]*$", "")
    suffixes = tf.strings.regex_replace(names, r"^.*_", "")
    image_id = tf.concat([ids, [""]], 0)[0]
    count = tf.size(names)
    matches = tf.equal(suffixes[:, None], tf.constant(COLORS)[None, :])  # [records, 4]
    per_color = tf.reduce_sum(tf.cast(matches, tf.int32), axis=0)
    known = tf.reduce_any(matches, axis=1)
    unknown = tf.concat([tf.boolean_mask(suffixes, tf.logical_not(known)), [""]], 0)[0]
    other_id = tf.concat([tf.boolean_mask(ids, tf.not_equal(ids, image_id)), [""]], 0)[0]
    target = tf.concat([features["target"], [""]], 0)[0]
    label, label_ok = _label_from_text(target)
    path = tf.strings.reduce_join(tf.unique(paths).y, separator=" and ")
    problem = tf.strings.reduce_join(problems)
    where = _join("file ", path, ": image ", image_id, ": ")
    problem = _first_problem([
        (tf.not_equal(problem, ""), problem),
        (tf.not_equal(count, len(COLORS)), _join(where, "only ", count, " records, expected 4: a record is missing")),
        (tf.reduce_any(tf.not_equal(ids, image_id)), _join(where, "its records were grouped with image ", other_id)),
        (tf.logical_not(tf.reduce_all(known)), _join(where, "unknown colour suffix '", unknown, "'")),
        (tf.reduce_any(tf.not_equal(per_color, 1)),
         _join(where, "colours ", tf.strings.reduce_join(suffixes, separator=","),
               " (need red, green, blue, yellow once each)")),
        (tf.reduce_any(tf.not_equal(features["target"], target)), _join(where, "its records disagree on the label")),
        (tf.logical_not(label_ok), _join(where, "label '", target, "' is not in 0..", N_CLASSES - 1)),
    ])
    # A padding row that matches every colour keeps argmax defined for short groups (reported above).
    padded = tf.concat([matches, tf.ones([1, len(COLORS)], tf.bool)], 0)
    images = tf.concat([features["image"], [""]], 0)
    order = [tf.argmax(tf.cast(padded[:, COLORS.index(color)], tf.int32), output_type=tf.int32) for color in colors]
    return {"id": image_id, "label": label, "data": tf.gather(images, order), "source": path, "problem": problem}


def _decode_png(png: tf.Tensor) -> tf.Tensor:
    """One greyscale PNG, 8- or 16-bit → float32 [H, W, 1] on the 0–255 scale."""
    # Decoding an 8-bit PNG as uint16 also works (×257) but costs a quarter more time, so look
    # at the IHDR bit depth (byte 24) and decode each kind natively.
    sixteen_bit = tf.equal(tf.strings.substr(png, 24, 1), b"\x10")
    return tf.cond(sixteen_bit,
                   lambda: tf.cast(tf.io.decode_png(png, channels=1, dtype=tf.uint16), tf.float32) / UINT16_TO_UINT8,
                   lambda: tf.cast(tf.io.decode_png(png, channels=1, dtype=tf.uint8), tf.float32))


def _decode_png_channels(pngs: tf.Tensor, count: int) -> tf.Tensor:
    """[C] greyscale PNG strings → float32 [H, W, C] on the 0–255 scale."""
    return tf.concat([_decode_png(pngs[i]) for i in range(count)], axis=-1)


def _resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Any size → [S, S, C]: area averaging when shrinking (no aliasing of fine structures, and
    3× cheaper than antialiased bilinear), bilinear when enlarging (area would be blocky)."""
    target = [image_size, image_size]
    shrinking = tf.shape(image)[0] >= image_size
    resized = tf.cond(shrinking, lambda: tf.image.resize(image, target, method="area"),
                      lambda: tf.image.resize(image, target, method="bilinear"))
    return tf.clip_by_value(resized, 0.0, 255.0)


resize = _resize  # public: `hpa_nb.cells` scores cells through this same kernel, so test matches training


def _channel_problem(element: dict, colors: tuple[str, ...], from_files: bool) -> tf.Tensor:
    """Why an image's channel PNGs did not decode, naming the bad one's file (PNG folder) or colour (TFRecord).

    Failure path only: each channel is decoded again on its own, inside ignore_errors.
    """
    load = tf.io.read_file if from_files else tf.identity

    def size(data: tf.Tensor) -> tf.Tensor:  # [height, width], or [-1, -1] when it does not decode
        sizes = tf.data.Dataset.from_tensors(data).map(lambda d: tf.shape(_decode_png(load(d)))[:2]).ignore_errors()
        return sizes.concatenate(tf.data.Dataset.from_tensors(tf.constant([-1, -1]))).take(1).get_single_element()

    sizes = tf.stack([size(element["data"][i]) for i in range(len(colors))])
    broken = tf.reduce_any(sizes < 0, axis=1)
    unequal = tf.reduce_any(tf.not_equal(sizes, sizes[:1]), axis=1)
    culprit = tf.argmax(tf.cast(tf.where(tf.reduce_any(broken), broken, unequal), tf.int32), output_type=tf.int32)
    name = tf.gather(element["data"], culprit) if from_files else element["source"]
    where = _join("file ", name, ": image ", element["id"], ": ")
    listing = tf.strings.reduce_join([_join(color, " ", sizes[i, 1], "x", sizes[i, 0])
                                      for i, color in enumerate(colors)], separator=", ")
    return _first_problem([
        (tf.reduce_any(broken), _join(where, "the ", tf.gather(tf.constant(colors), culprit), " PNG does not decode")),
        (tf.reduce_any(unequal), _join(where, "channels of unequal sizes (", listing, ")")),
        (tf.constant(True), _join("file ", element["source"], ": image ", element["id"], ": does not decode")),
    ])


# --- layouts: a source of "items" (files or image rows), a parser to elements, a decoder ------
@dataclass(frozen=True)
class _Layout:
    kind: str
    description: str
    items: Callable[[], tf.data.Dataset]
    item_count: int
    parse: Callable[[tf.data.Dataset, bool], tf.data.Dataset]  # items → {"id","label","data","problem"}
    decode: Callable[[tf.Tensor], tf.Tensor]                 # "data" → float32 [H, W, C] 0–255
    decode_can_fail: bool
    explain: Callable[[dict], tf.Tensor] | None = None       # element → why `decode` failed (failure path only)


def _tfrecord_layout(files: Sequence[str], colors: tuple[str, ...], ids: Iterable[str] | None,
                     exclude: Iterable[str] | None = None) -> _Layout:
    files = [str(f) for f in files]
    if not files:
        raise FileNotFoundError("no TFRecord files given")
    sizes = [_file_size(f) for f in files]
    wanted = _id_predicate(ids, exclude)

    def parse(items: tf.data.Dataset, deterministic: bool) -> tf.data.Dataset:
        groups = _image_records(items, min(FILE_CYCLE, len(files)), deterministic, wanted)
        return groups.map(lambda r, p, q: _competition_element(r, p, q, colors),
                          num_parallel_calls=AUTOTUNE, deterministic=deterministic)

    return _Layout("tfrecords", f"competition TFRecords ({len(files)} files)",
                   lambda: tf.data.Dataset.from_tensor_slices((files, tf.constant(sizes, tf.int64))),
                   len(files), parse, lambda pngs: _decode_png_channels(pngs, len(colors)), True,
                   lambda element: _channel_problem(element, colors, from_files=False))


def _png_layout(root: Path, colors: tuple[str, ...], ids: Iterable[str] | None, log: SkipLog | None,
                exclude: Iterable[str] | None = None) -> _Layout:
    frame = load_labels(root, skip_bad=log or False)
    folder = root / "train"
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} not found")
    if ids is not None:
        wanted = set(map(str, ids))
        frame = frame[frame["ID"].isin(wanted)]
    if exclude:
        frame = frame[~frame["ID"].isin(set(exclude))]
    present = {entry.name for entry in os.scandir(folder)}
    known_ids = set(frame["ID"])
    for name in sorted(present):  # a stray colour would otherwise go unnoticed
        image_id, _, rest = name.rpartition("_")
        if image_id in known_ids and rest.endswith(PNG_SUFFIX) and rest[: -len(PNG_SUFFIX)] not in COLORS:
            message = f"{folder / name}: unknown colour suffix '{rest[: -len(PNG_SUFFIX)]}'"
            if log is None:
                raise ValueError(message)
            log.add(message)
    rows, paths = [], []
    for image_id, text in zip(frame["ID"], frame["Label"]):
        names = [f"{image_id}_{color}{PNG_SUFFIX}" for color in colors]
        missing = [name for name in names if name not in present]
        problem = None
        if len(missing) == len(names):
            problem = f"image {image_id} is in train.csv but has no images in {folder}"
        elif missing:
            problem = f"image {image_id}: channel file {folder / missing[0]} is missing"
        if problem is not None:
            if log is None:
                raise FileNotFoundError(problem)
            log.add(problem)
            continue
        rows.append((image_id, text))
        paths.append([str(folder / name) for name in names])
    image_ids = [image_id for image_id, _ in rows]
    labels = label_matrix(image_ids, [text for _, text in rows])
    path_array = np.array(paths, dtype=object).reshape(len(rows), len(colors)).astype(str)

    def parse(items: tf.data.Dataset, deterministic: bool) -> tf.data.Dataset:
        return items.map(lambda image_id, label, files: {"id": image_id, "label": label, "data": files,
                                                          "source": tf.strings.reduce_join(files, separator=" or "),
                                                          "problem": tf.constant("")})

    def decode(files: tf.Tensor) -> tf.Tensor:
        pngs = tf.stack([tf.io.read_file(files[i]) for i in range(len(colors))])
        return _decode_png_channels(pngs, len(colors))

    return _Layout("png", f"PNG folder {folder} ({len(rows)} images)",
                   lambda: tf.data.Dataset.from_tensor_slices(
                       (tf.constant(image_ids, tf.string), labels.reshape(-1, N_CLASSES), path_array)),
                   len(rows), parse, decode, True, lambda element: _channel_problem(element, colors, from_files=True))


def read_manifest(shard_dir: str | Path) -> dict:
    """The manifest of a folder of compact shards (`write_shards`)."""
    path = Path(shard_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: not a finished shard folder") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if manifest.get("format") != SHARD_FORMAT:
        raise ValueError(f"{path} is not a {SHARD_FORMAT} manifest")
    return manifest


_SHARD_FEATURES = {"id": tf.io.FixedLenFeature([], tf.string, default_value=""),
                   "label": tf.io.FixedLenFeature([N_CLASSES], tf.float32, default_value=[0.0] * N_CLASSES),
                   "image": tf.io.FixedLenFeature([], tf.string, default_value="")}


def _shard_layout(shard_dir: Path, manifest: dict, colors: tuple[str, ...], ids: Iterable[str] | None,
                  exclude: Iterable[str] | None = None) -> _Layout:
    """The shards of `shard_dir`, read through its `manifest`, which `_choose_layout` found to hold `colors`."""
    stored = colors_of(manifest["channels"])
    size, stored_count, encoding = int(manifest["size"]), len(stored), manifest["encoding"]
    files = [str(shard_dir / entry["file"]) for entry in manifest["shards"]]
    sizes = [_file_size(f) for f in files]
    wanted = _id_predicate(ids, exclude)

    def element(record: tf.Tensor, path: tf.Tensor, problem: tf.Tensor) -> dict:
        features = tf.io.parse_single_example(record, _SHARD_FEATURES)  # a problem's empty record gives defaults
        image_id, image, label = features["id"], features["image"], features["label"]
        raw_ok = tf.equal(tf.strings.length(image), size * size * stored_count) | tf.constant(encoding != "raw")
        return {"id": image_id, "label": label, "data": image, "source": path, "problem": _first_problem([
            (tf.not_equal(problem, ""), problem),
            (tf.logical_not(raw_ok), _join("file ", path, ": image ", image_id, ": wrong image size")),
        ])}

    def parse(items: tf.data.Dataset, deterministic: bool) -> tf.data.Dataset:
        records = items.interleave(_file_records,
                                   cycle_length=min(FILE_CYCLE, len(files)), num_parallel_calls=AUTOTUNE,
                                   deterministic=deterministic)
        elements = records.map(element, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
        return elements.filter(lambda e: tf.not_equal(e["problem"], "") | wanted(e["id"]))

    def decode_raw(data: tf.Tensor) -> tf.Tensor:
        image = tf.reshape(tf.io.decode_raw(data, tf.uint8), [size, size, stored_count])
        return tf.cast(image[..., : len(colors)], tf.float32)

    def decode_png(data: tf.Tensor) -> tf.Tensor:
        image = tf.io.decode_png(data, channels=stored_count)
        return tf.cast(image[..., : len(colors)], tf.float32)

    decoders = {"raw": decode_raw, "png": decode_png}
    return _Layout("shards", f"compact shards {shard_dir} ({manifest['count']} images, {size} px, "
                             f"{manifest['channels']}, {encoding})",
                   lambda: tf.data.Dataset.from_tensor_slices((files, tf.constant(sizes, tf.int64))),
                   len(files), parse, decoders[encoding], encoding != "raw")


def _choose_layout(root: str | Path, channels: str, ids: Iterable[str] | None, log: SkipLog | None,
                   allow_shards: bool = True, exclude: Iterable[str] | None = None) -> _Layout:
    """The fastest layout in `root`: compact shards, then competition TFRecords, then PNGs."""
    root = Path(root)
    colors = colors_of(channels)
    shard_dir = root / SHARD_DIR
    if allow_shards and (shard_dir / MANIFEST).is_file():
        manifest = read_manifest(shard_dir)
        if colors_of(manifest["channels"])[: len(colors)] == colors:
            return _shard_layout(shard_dir, manifest, colors, ids, exclude)
        print(f"data: ignoring {shard_dir} ({manifest['channels']} shards, {channels} requested)", file=sys.stderr)
    records = sorted(tf.io.gfile.glob(str(root / "train_tfrecords" / TFRECORD_PATTERN)))
    if records:
        return _tfrecord_layout(records, colors, ids, exclude)
    if (root / "train.csv").is_file():
        return _png_layout(root, colors, ids, log, exclude)
    raise FileNotFoundError(f"{root} has no shards/, train_tfrecords/*.tfrec or train.csv")


# --- decoding, with bad input named ----------------------------------------------------------
def _decode_stage(elements: tf.data.Dataset, layout: _Layout, image_size: int, channel_count: int,
                  deterministic: bool, log: SkipLog | None) -> tf.data.Dataset:
    """{"id","label","data","problem"} → (image [S,S,C], label, id), raising or skipping on bad input."""

    def decode(element: dict) -> tuple:
        image = _resize(layout.decode(element["data"]), image_size)
        return image, element["label"], element["id"], tf.constant("")

    if layout.decode_can_fail:
        # A decode error names no file or ID. Decoding inside a one-element dataset with
        # ignore_errors, followed by a flagged stand-in, turns the error into a named problem.
        # The stand-in's map runs only when it is reached (take(1) stops after a decoded image),
        # so `explain` (a second, per-channel decode) costs nothing on good images.
        def flag(element: dict) -> tuple:
            def explain() -> tf.Tensor:
                if layout.explain is not None:
                    return layout.explain(element)
                return _join("file ", element["source"], ": image ", element["id"], ": its PNG does not decode")

            problem = tf.cond(tf.equal(element["problem"], ""), explain, lambda: element["problem"])
            return tf.zeros([0, 0, channel_count]), element["label"], element["id"], problem

        def decode_or_flag(element: dict) -> tf.data.Dataset:
            decoded = tf.data.Dataset.from_tensors(element).filter(lambda e: tf.equal(e["problem"], ""))
            decoded = decoded.map(decode).ignore_errors()
            return decoded.concatenate(tf.data.Dataset.from_tensors(element).map(flag)).take(1)

        images = elements.interleave(decode_or_flag, cycle_length=AUTOTUNE, block_length=1,
                                     num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    else:
        images = elements.map(lambda e: tf.cond(tf.equal(e["problem"], ""), lambda: decode(e), lambda: (
            tf.zeros([image_size, image_size, channel_count]), e["label"], e["id"], e["problem"])),
            num_parallel_calls=AUTOTUNE, deterministic=deterministic)

    if log is not None:
        images = images.filter(lambda image, label, image_id, problem: log.keep(problem))
    else:
        def raise_on_problem(image, label, image_id, problem):
            with tf.control_dependencies([tf.debugging.Assert(tf.equal(problem, ""), [problem])]):
                return tf.identity(image), label, image_id, problem

        images = images.map(raise_on_problem)
    shape = [image_size, image_size, channel_count]
    return images.map(lambda image, label, image_id, problem: (tf.ensure_shape(image, shape), label, image_id))


def _public(images: tf.data.Dataset, with_id: bool) -> tf.data.Dataset:
    return images if with_id else images.map(lambda image, label, image_id: (image, label))


def _read(layout: _Layout, image_size: int, channels: str, with_id: bool, deterministic: bool,
          log: SkipLog | None) -> tf.data.Dataset:
    elements = layout.parse(layout.items(), deterministic)
    images = _decode_stage(elements, layout, image_size, len(colors_of(channels)), deterministic, log)
    return _public(images, with_id)


def read_tfrecords(files: str | Path | Sequence[str | Path], image_size: int, channels: str = "rgb",
                   with_id: bool = False, deterministic: bool = True, ids: Iterable[str] | None = None,
                   skip_bad: bool | SkipLog = False) -> tf.data.Dataset:
    """Competition TFRecords (one record per channel) → ``(image, label)`` or ``(image, label, id)``.

    `files` is a list of ``.tfrec`` files or a folder of them. Each record is decoded once; an
    image's four records are brought together by ID wherever they sit (see `_image_records` for
    the memory bound) and matched by colour, so no record order, and no ``deterministic=False``
    (faster, any interleave), can pair one image's red with another's green. `ids` keeps only those images.
    """
    if isinstance(files, (str, Path)) and Path(files).is_dir():
        files = sorted(tf.io.gfile.glob(str(Path(files) / TFRECORD_PATTERN)))
    elif isinstance(files, (str, Path)):
        files = [files]
    layout = _tfrecord_layout([str(f) for f in files], colors_of(channels), ids)
    return _read(layout, image_size, channels, with_id, deterministic, _skip_log(skip_bad))


def read_png_dir(root: str | Path, image_size: int, channels: str = "rgb", with_id: bool = False,
                 ids: Iterable[str] | None = None, skip_bad: bool | SkipLog = False) -> tf.data.Dataset:
    """``root/train.csv`` + ``root/train/{ID}_{color}.png`` → ``(image, label)`` or ``(image, label, id)``.

    Images come in train.csv order. A missing channel file, an ID without images or a bad
    label raises naming the file or ID before anything is read (or is skipped with `skip_bad`).
    """
    log = _skip_log(skip_bad)
    layout = _png_layout(Path(root), colors_of(channels), ids, log)
    return _read(layout, image_size, channels, with_id, True, log)


def open_dataset(root: str | Path, image_size: int, channels: str = "rgb", with_id: bool = False,
                 ids: Iterable[str] | None = None, deterministic: bool = True,
                 skip_bad: bool | SkipLog = False) -> tf.data.Dataset:
    """The images of a data folder through its fastest layout: shards, then TFRecords, then PNGs.

    Prints one line saying which layout it used. `ids` keeps only those images (for a split).
    """
    log = _skip_log(skip_bad)
    layout = _choose_layout(root, channels, ids, log)
    print(f"data: reading {layout.description}")
    return _read(layout, image_size, channels, with_id, deterministic, log)


def take_images(dataset: tf.data.Dataset, count: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The first `count` elements of an unbatched ``(image, label, id)`` dataset as numpy (notebook previews)."""
    images, labels, ids = [], [], []
    for image, label, image_id in dataset.take(count).as_numpy_iterator():
        images.append(image)
        labels.append(label)
        ids.append(image_id.decode())
    if not images:
        raise ValueError("the dataset yielded no images")
    return np.stack(images), np.stack(labels), ids


# --- training and evaluation pipelines ----------------------------------------------------------
def _stateless_shuffle(elements: tf.data.Dataset, window: int, seed: tf.Tensor) -> tf.data.Dataset:
    """Permute each run of `window` consecutive elements, drawn from `seed` alone (a [2] tensor).

    Unlike ``Dataset.shuffle`` this takes a seed computed in the pipeline (one per pass), which
    is what lets a stream start at any pass; over a whole pass (`window` ≥ its length) it is a
    uniform permutation.
    """
    def permute(window_index: tf.Tensor, batch):
        size = tf.shape(tf.nest.flatten(batch)[0])[0]
        order = tf.random.experimental.stateless_shuffle(
            tf.range(size), seed=tf.random.experimental.stateless_fold_in(seed, window_index))
        return tf.nest.map_structure(lambda values: tf.gather(values, order), batch)

    return elements.batch(window).enumerate().map(permute).unbatch()


def training_dataset(root: str | Path, ids: Iterable[str] | None, image_size: int, channels: str = "rgb",
                     batch_size: int = 32, seed: int = 0, augment: bool = True, cache: bool = False,
                     drop_remainder: bool = True, num_workers: int = 1, worker_index: int = 0,
                     shuffle_buffer: int = SHUFFLE_BUFFER, deterministic: bool = True,
                     start_batch: int = 0) -> tf.data.Dataset:
    """An infinite, shuffled, augmented, batched dataset of ``(image, label)`` for ``model.fit``.

    The stream is a sequence of passes over the data, each shuffled with a seed of its own
    (from `seed` and the pass number: the file order, then windows of `shuffle_buffer` records), and each image is augmented with a seed from its position
    in the stream. So the same seed gives the same batches (``deterministic=True``), and
    ``start_batch=K`` gives exactly the stream from its K-th batch on: a resumed run continues
    where it stopped instead of replaying the first epoch. Only compressed records are skipped
    to get there, never decoded images. That needs `ids` (a pass is ``len(ids)`` images) and one
    worker. With ``cache=True`` decoded images are kept in memory (S·S·C·4 bytes each) and
    decoding moves before the cache. `num_workers`/`worker_index` give each host of a
    multi-host run its own part of the data.
    """
    from hpa_nb.augment import augment as augment_image

    if not 0 <= worker_index < num_workers:
        raise ValueError(f"worker_index {worker_index} is outside 0..{num_workers - 1}")
    ids = None if ids is None else list(ids)
    if start_batch and (ids is None or num_workers > 1):
        raise ValueError("start_batch needs the image IDs and a single worker")
    layout = _choose_layout(root, channels, ids, None)
    print(f"data: reading {layout.description}")
    channel_count = len(colors_of(channels))
    shard_files = num_workers > 1 and layout.item_count >= num_workers

    def records(pass_seed: tf.Tensor | None) -> tf.data.Dataset:
        # files: each worker takes its own files when there are enough of them, so hosts never
        # read the same bytes; the file order changes every pass.
        items = layout.items()
        if shard_files:
            items = items.shard(num_workers, worker_index)
        if pass_seed is not None:
            items = _stateless_shuffle(items, max(layout.item_count, 1), pass_seed)
        # interleave → parse: cheap string work; an image's records are brought together by ID, so the order can be free.
        elements = layout.parse(items, deterministic)
        if num_workers > 1 and not shard_files:  # too few files: split records instead
            elements = elements.shard(num_workers, worker_index)
        return elements

    def pass_seed(pass_index: tf.Tensor) -> tf.Tensor:
        return tf.random.experimental.stateless_fold_in(tf.constant([seed, 1], tf.int64), pass_index)

    images_per_pass = len(set(ids)) if ids is not None else 0
    first_pass, offset = divmod(start_batch * batch_size, max(images_per_pass, 1)) if start_batch else (0, 0)
    passes = tf.data.Dataset.range(first_pass, 2**62)
    if cache:
        # decode once into the cache (decoding is the expensive part), then permute the cached images each pass.
        decoded = _decode_stage(records(None), layout, image_size, channel_count, deterministic, None).cache()
        window = images_per_pass or shuffle_buffer
        images = passes.flat_map(lambda index: _stateless_shuffle(decoded, window, pass_seed(index))).skip(offset)
    else:
        # shuffle compressed records (small), skip to the start, and only then decode: decoding is the
        # parallel, AUTOTUNEd map, and the shuffle never holds decoded float images.
        elements = passes.flat_map(lambda index: _stateless_shuffle(records(pass_seed(index)), shuffle_buffer,
                                                                    pass_seed(index)))
        images = _decode_stage(elements.skip(offset), layout, image_size, channel_count, deterministic, None)
    # augment: stateless, seeded by (seed, worker, position in the whole stream) so a run repeats exactly.
    base_seed = tf.constant([seed, worker_index], tf.int64)

    def augment_element(index: tf.Tensor, element: tuple) -> tuple:
        image, label, _ = element
        if augment:
            image = augment_image(image, tf.random.experimental.stateless_fold_in(base_seed, index))
        return image, label

    images = images.enumerate(start=start_batch * batch_size).map(
        augment_element, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    # batch with drop_remainder: a TPU compiles for one static batch shape.
    images = images.batch(batch_size, drop_remainder=drop_remainder)
    # prefetch: decode the next batches while the accelerator runs this one.
    return images.prefetch(AUTOTUNE)


def eval_dataset(root: str | Path, ids: Iterable[str] | None, image_size: int, channels: str = "rgb",
                 batch_size: int = 32, with_id: bool = True, cache: bool = False) -> tf.data.Dataset:
    """A finite, ordered, batched dataset without augmentation; the last partial batch is kept.

    With ``cache=True`` the decoded images are kept in memory after the first pass (S·S·C·4
    bytes each), so a validation set is read and decoded once, not every epoch.
    """
    images = open_dataset(root, image_size, channels, with_id=with_id, ids=ids, deterministic=True)
    if cache:
        images = images.cache()
    return images.batch(batch_size, drop_remainder=False).prefetch(AUTOTUNE)


# --- splits ----------------------------------------------------------------------------------
def split(ids: Sequence[str], labels_matrix: np.ndarray, val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """A deterministic multi-label stratified split: ``(train_ids, val_ids)`` in input order.

    Iterative stratification (Sechidis, Tsoumakas & Vlahavas, 2011): the rarest label is placed
    first, each of its images going to the side that still wants that label most. A label with
    at least two images is wanted at least once on each side, so rare classes reach both.
    """
    ids = [str(i) for i in ids]
    matrix = np.asarray(labels_matrix, dtype=bool)
    if matrix.ndim != 2 or matrix.shape[0] != len(ids):
        raise ValueError(f"labels matrix has shape {matrix.shape}, expected ({len(ids)}, classes)")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, not {val_fraction}")
    if len(set(ids)) != len(ids):
        raise ValueError("split: repeated image IDs")
    rng = np.random.default_rng(seed)
    count = len(ids)
    fractions = np.array([1.0 - val_fraction, val_fraction])
    wanted_images = fractions * count
    per_label = matrix.sum(axis=0).astype(float)
    wanted_labels = np.outer(fractions, per_label)  # [2 sides, labels]
    rare_enough = per_label >= 2
    wanted_labels[1, rare_enough] = np.maximum(wanted_labels[1, rare_enough], 1.0)
    wanted_labels[0, rare_enough] = np.maximum(per_label[rare_enough] - wanted_labels[1, rare_enough], 1.0)
    side = np.full(count, -1)
    remaining = matrix.copy()
    while remaining.any():
        label_sizes = remaining.sum(axis=0)
        candidates = np.flatnonzero(label_sizes == label_sizes[label_sizes > 0].min())
        label = rng.choice(candidates)
        for image in rng.permutation(np.flatnonzero(remaining[:, label])):
            scores = np.stack([wanted_labels[:, label], wanted_images, rng.random(2)], axis=1)
            chosen = max((0, 1), key=lambda s: tuple(scores[s]))
            side[image] = chosen
            wanted_labels[chosen] -= matrix[image]
            wanted_images[chosen] -= 1
            remaining[image] = False
    for image in rng.permutation(np.flatnonzero(side < 0)):  # images without labels
        chosen = int(np.argmax(wanted_images + rng.random(2) * 1e-6))
        side[image] = chosen
        wanted_images[chosen] -= 1
    return [i for i, s in zip(ids, side) if s == 0], [i for i, s in zip(ids, side) if s == 1]


# --- compact shards --------------------------------------------------------------------------
def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.tfrec"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _finished_shards(out: Path, settings: dict) -> dict[str, list[str]]:
    """Shards completed by earlier runs (name → IDs); leftovers of a killed run are removed."""
    for stale in out.glob(TEMPORARY_GLOB):
        stale.unlink()
    finished = {}
    for path in sorted(out.glob("shard-*.tfrec")):  # renamed after its sidecar, so every one has its ID list
        record = json.loads(_sidecar(path).read_text())
        mismatched = {key: record.get(key) for key, value in settings.items() if record.get(key) != value}
        if mismatched:
            raise ValueError(f"{out} already holds shards with {mismatched}, not {settings}: use another --out")
        finished[path.name] = record["ids"]
    for sidecar in out.glob("shard-*.tfrec.json"):
        if not sidecar.with_suffix("").is_file():  # killed between the sidecar and the rename: redo those images
            sidecar.unlink()
    return finished


def _shard_example(image: np.ndarray, label: np.ndarray, image_id: bytes, encoding: str) -> bytes:
    data = image.tobytes() if encoding == "raw" else tf.io.encode_png(image).numpy()
    feature = {"id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_id])),
               "label": tf.train.Feature(float_list=tf.train.FloatList(value=label.tolist())),
               "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data]))}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_shards(src: str | Path, out: str | Path | None = None, size: int = 512, channels: str = "rgby",
                 encoding: str = "raw", images_per_shard: int | None = None, skip_bad: bool | SkipLog = False,
                 progress: bool = True) -> dict:
    """Write compact training shards: one record per image, all channels resized once, uint8.

    `out` defaults to ``src/shards`` (where `open_dataset` looks). Shards hold about 150 MB
    each. Restartable: a shard is written under a temporary name and renamed when complete,
    a rerun skips finished shards, and the manifest (written last) lists only finished ones.
    ``encoding="png"`` trades read speed for disk space (raw rgby at 512 px is 1 MiB an image).
    Returns the manifest.
    """
    from tqdm import tqdm  # plain text bars: the same in a terminal, a notebook and a Kaggle log

    if encoding not in SHARD_ENCODINGS:
        raise ValueError(f"encoding must be one of {SHARD_ENCODINGS}, not {encoding!r}")
    if size < 8:
        raise ValueError(f"shard size {size} px is too small")
    colors = colors_of(channels)
    src = Path(src)
    out = Path(out) if out is not None else src / SHARD_DIR
    out.mkdir(parents=True, exist_ok=True)
    settings = {"size": size, "channels": channels, "encoding": encoding}
    finished = _finished_shards(out, settings)
    done_ids = [image_id for ids in finished.values() for image_id in ids]
    log = _skip_log(skip_bad)
    # PNGs first: the image list is known up front (a true progress total) and only the wanted
    # channels are read; the competition TFRecords also carry the unwanted ones.
    if (src / "train.csv").is_file() and (src / "train").is_dir():
        layout = _png_layout(src, colors, None, log, exclude=done_ids)
    else:
        layout = _choose_layout(src, channels, None, log, allow_shards=False, exclude=done_ids)
    print(f"shard: reading {layout.description}; {len(done_ids)} images already in {len(finished)} shards")
    per_shard = images_per_shard or max(1, SHARD_TARGET_BYTES // (size * size * len(colors)))
    images = _read(layout, size, channels, True, True, log)
    images = images.map(lambda image, label, image_id: (tf.cast(tf.round(image), tf.uint8), label, image_id),
                        num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)
    total = layout.item_count if layout.kind == "png" else None
    index = max((int(name[6:11]) + 1 for name in finished), default=0)
    writer, temporary, shard_ids = None, None, []

    def close_shard() -> None:
        nonlocal writer, temporary, shard_ids, index
        writer.close()
        final = out / _shard_name(index)
        write_text(_sidecar(final), json.dumps({**settings, "ids": shard_ids}))
        os.replace(temporary, final)  # the rename is the commit: a shard under its final name is whole
        finished[final.name] = shard_ids
        writer, temporary, shard_ids, index = None, None, [], index + 1

    bar = tqdm(total=total, unit="img", desc="shard", disable=not progress)
    try:
        for image, label, image_id in images.as_numpy_iterator():
            if writer is None:
                # created by the writer, so with ordinary permissions: shards are shared data
                temporary = temporary_path(out / _shard_name(index))
                writer = tf.io.TFRecordWriter(str(temporary))
            writer.write(_shard_example(image, label, image_id, encoding))
            shard_ids.append(image_id.decode())
            bar.update(1)
            if len(shard_ids) == per_shard:
                close_shard()
        if writer is not None:
            close_shard()
    finally:
        bar.close()
        if writer is not None:  # interrupted: never leave a temporary file behind to look like data
            writer.close()
            temporary.unlink(missing_ok=True)
    shards = [{"file": name, "count": len(ids)} for name, ids in sorted(finished.items())]
    manifest = {"format": SHARD_FORMAT, "version": 1, **settings, "count": sum(s["count"] for s in shards),
                "shards": shards, "source": str(src), "skipped": log.count if log else 0}
    write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    if log is not None and log.count:
        print(f"warning: skipped {log.count} bad images or files (listed above)", file=sys.stderr)
    return manifest
