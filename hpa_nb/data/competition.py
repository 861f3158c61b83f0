"""The competition's own layouts: ``train.csv``, ``train_tfrecords/*.tfrec`` (one record per
channel) and ``train/{ID}_{colour}.png``.

An image's four records are brought together by ID and colour, never by position, and each is
decoded once (`hpa_nb.data.reading`). Every bad input (a truncated file, a corrupt PNG, mixed or
missing colours, a bad label) is named by file and ID. `encode_record` and `write_tfrecord` write
the same format, for the sample, the benchmarks and the tests.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import tensorflow as tf

from hpa_nb.core.labels import COLORS, N_CLASSES, label_matrix, parse_label
from hpa_nb.data.bad_input import SkipLog, first_problem, join_text, skip_log
from hpa_nb.data.reading import (
    AUTOTUNE,
    Layout,
    decode_png_channels,
    decode_resize_sized,
    file_records,
    file_size,
    files_at_once,
    id_predicate,
)

PNG_SUFFIX = ".png"
TFRECORD_PATTERN = "*.tfrec"
# Images in the competition's train.csv (the Kaggle data page): what a full-set projection counts.
TRAIN_IMAGES = 21806
# Files grouped at once when the order is free: colour-major files are held whole until their images complete.
MAX_FILES_AT_ONCE = 16


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
    if frame.empty:  # written out, it would be an empty set that the next kernel takes for data
        raise ValueError(f"{path} has no rows: there are no images to read")
    repeated = frame["ID"][frame["ID"].duplicated()]
    if len(repeated):
        raise ValueError(f"{path}: image {repeated.iloc[0]} is listed more than once")
    log = skip_log(skip_bad)
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


def encode_record(image_name: str, png: bytes, target: str) -> bytes:
    """One record as the competition's TFRecords hold it: a channel's PNG bytes, ``{ID}_{colour}`` and
    the image's label text, serialized with sorted keys (the same bytes every run)."""
    feature = {
        key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
        for key, value in (("image", png), ("image_name", image_name.encode()), ("target", target.encode()))
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def write_tfrecord(path: str | Path, records: Iterable[bytes]) -> Path:
    """Write serialized records (`encode_record`) to one TFRecord file, in order."""
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    return Path(path)


def _label_from_text(text: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Graph-side `parse_label`: (multi-hot [19], whether the text was a valid label)."""
    well_formed = tf.strings.regex_full_match(text, r"\s*\d{1,3}(\|\d{1,3})*\s*")
    safe = tf.where(well_formed, tf.strings.strip(text), "0")
    indices = tf.strings.to_number(tf.strings.split(safe, "|"), tf.int32)
    in_range = tf.reduce_all((indices >= 0) & (indices < N_CLASSES))
    label = tf.reduce_max(tf.one_hot(indices, N_CLASSES, dtype=tf.float32), axis=0)
    return label, well_formed & in_range


_COMPETITION_FEATURES = {
    name: tf.io.FixedLenFeature([], tf.string, default_value="") for name in ("image", "image_name", "target")
}


def _decoded_records(
    files: tf.data.Dataset,
    cycle: int,
    deterministic: bool,
    wanted: Callable[[tf.Tensor], tf.Tensor],
    colors: tuple[str, ...],
    image_size: int,
) -> tf.data.Dataset:
    """Each competition record parsed, and decoded and resized once if its colour is wanted, exactly
    as the physical floor of a reader does it (one plain parallel map): ``{"channel" [S, S, 1],
    "hw" [2], "image", "color", "target", "path", "problem"}``.

    A record whose PNG does not decode is dropped here (a per-record check that could name it
    costs a tenth of the throughput); its image's group then comes out one record short, and
    `_competition_element` names the file, the image and the colour that is missing. Records of an
    unwanted colour keep their place for those checks but are not decoded. Records of unwanted
    images are dropped first.
    """
    records = files.interleave(
        file_records, cycle_length=cycle, num_parallel_calls=AUTOTUNE, deterministic=deterministic
    )
    wanted_colors = tf.constant(colors)

    def parse(record: tf.Tensor, path: tf.Tensor, problem: tf.Tensor) -> dict:
        features = tf.io.parse_single_example(record, _COMPETITION_FEATURES)  # a problem's empty record: defaults
        name = features["image_name"]
        return {
            "png": features["image"],
            "image": tf.strings.regex_replace(name, r"_[^_]*$", ""),
            "color": tf.strings.regex_replace(name, r"^.*_", ""),
            "target": features["target"],
            "path": path,
            "problem": problem,
        }

    def decode(r: dict) -> dict:
        skip = tf.not_equal(r["problem"], "") | tf.logical_not(tf.reduce_any(tf.equal(r["color"], wanted_colors)))
        channel, hw = tf.cond(
            skip,
            lambda: (tf.zeros([image_size, image_size, 1]), tf.constant([-1, -1])),
            lambda: decode_resize_sized(r["png"], image_size),
        )
        return {
            "channel": channel,
            "hw": hw,
            **{key: r[key] for key in ("image", "color", "target", "path", "problem")},
        }

    records = records.map(parse, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    records = records.filter(lambda r: tf.not_equal(r["problem"], "") | wanted(r["image"]))
    return records.map(decode, num_parallel_calls=AUTOTUNE, deterministic=deterministic).ignore_errors()


def _image_records(records: tf.data.Dataset) -> tf.data.Dataset:
    """Decoded records (`_decoded_records`) brought together by image, whatever their order.

    An image's four records may sit anywhere: interleaved with other images', colour by colour, or
    in two files. A group leaves as soon as its fourth record arrives, so memory holds only the
    decoded channels (S·S·4 bytes each) of images still incomplete, at most those of the files
    being read (8 in a deterministic order, at most `MAX_FILES_AT_ONCE` otherwise; colour-major
    files are the worst case: each file whole). A group still incomplete when the files end comes
    out short, for `_competition_element` to report; a file's problem (truncated, corrupt) travels alone.
    """

    def key(r: dict) -> tf.Tensor:
        return tf.where(
            tf.not_equal(r["problem"], "") & tf.equal(r["image"], ""),
            tf.constant(-1, tf.int64),
            tf.strings.to_hash_bucket_fast(r["image"], 2**62),
        )

    return records.group_by_window(
        key_func=key,
        reduce_func=lambda _, window: window.batch(len(COLORS)),
        window_size_func=lambda group: tf.where(group < 0, tf.constant(1, tf.int64), len(COLORS)),
    )


def _competition_element(group: dict, colors: tuple[str, ...]) -> dict:
    """Check one image's group of decoded records (from `_image_records`) and stack its channels by colour."""
    ids, suffixes, targets = group["image"], group["color"], group["target"]
    image_id = tf.concat([ids, [""]], 0)[0]
    count = tf.size(ids)
    matches = tf.equal(suffixes[:, None], tf.constant(COLORS)[None, :])  # [records, 4]
    per_color = tf.reduce_sum(tf.cast(matches, tf.int32), axis=0)
    known = tf.reduce_any(matches, axis=1)
    unknown = tf.concat([tf.boolean_mask(suffixes, tf.logical_not(known)), [""]], 0)[0]
    other_id = tf.concat([tf.boolean_mask(ids, tf.not_equal(ids, image_id)), [""]], 0)[0]
    target = tf.concat([targets, [""]], 0)[0]
    label, label_ok = _label_from_text(target)
    path = tf.strings.reduce_join(tf.unique(group["path"]).y, separator=" and ")
    problem = tf.strings.reduce_join(group["problem"])
    where = join_text("file ", path, ": image ", image_id, ": ")
    # A padding row that matches every colour keeps argmax defined for short groups (reported below).
    padded = tf.concat([matches, tf.ones([1, len(COLORS)], tf.bool)], 0)
    order = tf.stack(
        [tf.argmax(tf.cast(padded[:, COLORS.index(color)], tf.int32), output_type=tf.int32) for color in colors]
    )
    sizes = tf.gather(tf.concat([group["hw"], [[-1, -1]]], 0), order)  # [C, 2]
    listing = tf.strings.reduce_join(
        [join_text(color, " ", sizes[i, 1], "x", sizes[i, 0]) for i, color in enumerate(colors)], separator=", "
    )
    problem = first_problem(
        [
            (tf.not_equal(problem, ""), problem),
            (
                tf.not_equal(count, len(COLORS)),
                join_text(
                    where,
                    "only ",
                    count,
                    " records, expected 4: a record is missing or its PNG does not decode (",
                    tf.strings.reduce_join(tf.boolean_mask(tf.constant(COLORS), tf.equal(per_color, 0)), separator=","),
                    ")",
                ),
            ),
            (
                tf.reduce_any(tf.not_equal(ids, image_id)),
                join_text(where, "its records were grouped with image ", other_id),
            ),
            (tf.logical_not(tf.reduce_all(known)), join_text(where, "unknown colour suffix '", unknown, "'")),
            (
                tf.reduce_any(tf.not_equal(per_color, 1)),
                join_text(
                    where,
                    "colours ",
                    tf.strings.reduce_join(suffixes, separator=","),
                    " (need red, green, blue, yellow once each)",
                ),
            ),
            (tf.reduce_any(tf.not_equal(targets, target)), join_text(where, "its records disagree on the label")),
            (tf.logical_not(label_ok), join_text(where, "label '", target, "' is not in 0..", N_CLASSES - 1)),
            (
                tf.reduce_any(tf.not_equal(sizes, sizes[:1])),
                join_text(where, "channels of unequal sizes (", listing, ")"),
            ),
        ]
    )
    channels = tf.concat([group["channel"], tf.zeros_like(group["channel"][:1])], 0)
    image = tf.concat(tf.unstack(tf.gather(channels, order)), axis=-1)  # [S, S, C]
    return {"id": image_id, "label": label, "data": image, "source": path, "problem": problem}


def tfrecord_layout(
    files: Sequence[str], colors: tuple[str, ...], ids: Iterable[str] | None, exclude: Iterable[str] | None = None
) -> Layout:
    """Competition TFRecords: each record decoded once, then grouped by image (the decoding is in `parse`)."""
    files = [str(f) for f in files]
    if not files:
        raise FileNotFoundError("no TFRecord files given")
    sizes = [file_size(f) for f in files]
    wanted = id_predicate(ids, exclude)

    def parse(items: tf.data.Dataset, deterministic: bool, image_size: int) -> tf.data.Dataset:
        cycle = files_at_once(len(files), deterministic, MAX_FILES_AT_ONCE)
        records = _decoded_records(items, cycle, deterministic, wanted, colors, image_size)
        return _image_records(records).map(
            lambda group: _competition_element(group, colors), num_parallel_calls=AUTOTUNE, deterministic=deterministic
        )

    return Layout(
        "tfrecords",
        f"competition TFRecords ({len(files)} files)",
        lambda: tf.data.Dataset.from_tensor_slices((files, tf.constant(sizes, tf.int64))),
        len(files),
        parse,
        lambda image, size: image,
        False,
    )


def _png_problem(element: dict, colors: tuple[str, ...]) -> tf.Tensor:
    """Why an image's channel files did not decode, naming the bad one's file.

    Failure path only: each channel is read and decoded again on its own, inside ignore_errors.
    """

    def size(path: tf.Tensor) -> tf.Tensor:  # [height, width], or [-1, -1] when it does not decode
        sizes = (
            tf.data.Dataset.from_tensors(path)
            .map(lambda p: tf.shape(tf.io.decode_png(tf.io.read_file(p), channels=1, dtype=tf.uint16))[:2])
            .ignore_errors()
        )
        return sizes.concatenate(tf.data.Dataset.from_tensors(tf.constant([-1, -1]))).take(1).get_single_element()

    sizes = tf.stack([size(element["data"][i]) for i in range(len(colors))])
    broken = tf.reduce_any(sizes < 0, axis=1)
    unequal = tf.reduce_any(tf.not_equal(sizes, sizes[:1]), axis=1)
    culprit = tf.argmax(tf.cast(tf.where(tf.reduce_any(broken), broken, unequal), tf.int32), output_type=tf.int32)
    where = join_text("file ", tf.gather(element["data"], culprit), ": image ", element["id"], ": ")
    listing = tf.strings.reduce_join(
        [join_text(color, " ", sizes[i, 1], "x", sizes[i, 0]) for i, color in enumerate(colors)], separator=", "
    )
    return first_problem(
        [
            (
                tf.reduce_any(broken),
                join_text(where, "the ", tf.gather(tf.constant(colors), culprit), " PNG does not decode"),
            ),
            (tf.reduce_any(unequal), join_text(where, "channels of unequal sizes (", listing, ")")),
            (tf.constant(True), join_text("file ", element["source"], ": image ", element["id"], ": does not decode")),
        ]
    )


def png_layout(
    root: Path,
    colors: tuple[str, ...],
    ids: Iterable[str] | None,
    log: SkipLog | None,
    exclude: Iterable[str] | None = None,
) -> Layout:
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

    def parse(items: tf.data.Dataset, deterministic: bool, image_size: int) -> tf.data.Dataset:
        return items.map(
            lambda image_id, label, files: {
                "id": image_id,
                "label": label,
                "data": files,
                "source": tf.strings.reduce_join(files, separator=" or "),
                "problem": tf.constant(""),
            }
        )

    def decode(files: tf.Tensor, image_size: int) -> tf.Tensor:
        pngs = tf.stack([tf.io.read_file(files[i]) for i in range(len(colors))])
        return decode_png_channels(pngs, len(colors), image_size)

    return Layout(
        "png",
        f"PNG folder {folder} ({len(rows)} images)",
        lambda: tf.data.Dataset.from_tensor_slices(
            (tf.constant(image_ids, tf.string), labels.reshape(-1, N_CLASSES), path_array)
        ),
        len(rows),
        parse,
        decode,
        True,
        lambda element: _png_problem(element, colors),
    )
