"""What every layout of HPA images shares: a file's records with truncation named, a filter on
image IDs, the decode-and-resize kernel, and the decode stage that turns a layout's elements into
``(image, label, id)`` with bad input named.

A `Layout` (competition TFRecords and PNG folders in `hpa_nb.data.competition`, compact shards in
`hpa_nb.data.shards`) says where its items come from, how to parse them into elements
``{"id", "label", "data", "source", "problem"}``, and how to decode ``data``; `read` runs one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable

import tensorflow as tf

from hpa_nb.core.labels import colors_of
from hpa_nb.data.bad_input import SkipLog, join_text

# A TFRecord on disk: 8-byte length, 4-byte length CRC, payload, 4-byte payload CRC.
TFRECORD_OVERHEAD = 16
# 65535 / 255: a 16-bit value on the 0–255 scale.
UINT16_TO_UINT8 = 257.0
AUTOTUNE = tf.data.AUTOTUNE
# Files read at once in a deterministic order: fixed, so that the order is the same on every machine.
FILE_CYCLE = 8

# The pipelines' functions are TensorFlow ops without Python control flow on tensors, so tf.data traces them as they
# are written: AutoGraph's conversion (parsing and rewriting the source of every function they call, each lambda again
# at every build) took 10 s of a quick training process's 45 s on 2 cores (measured). The builders run under this.
as_written = tf.autograph.experimental.do_not_convert


def files_at_once(file_count: int, deterministic: bool, limit: int | None = None) -> int:
    """How many files a reader interleaves: `FILE_CYCLE` when the order must repeat; otherwise one
    per CPU core (a TPU host has 96–224), at most `limit`."""
    cycle = FILE_CYCLE if deterministic else max(FILE_CYCLE, os.cpu_count() or 1)
    return max(1, min(cycle, file_count, limit or cycle))


@dataclass(frozen=True)
class Layout:
    kind: str
    description: str
    items: Callable[[], tf.data.Dataset]
    item_count: int
    parse: Callable[[tf.data.Dataset, bool, int], tf.data.Dataset]  # (items, deterministic, S) → elements
    decode: Callable[[tf.Tensor, int], tf.Tensor]  # ("data", S) → float32 [S, S, C] 0–255
    decode_can_fail: bool
    explain: Callable[[dict], tf.Tensor] | None = None  # element → why `decode` failed (failure path only)


def id_predicate(ids: Iterable[str] | None, exclude: Iterable[str] | None = None) -> Callable[[tf.Tensor], tf.Tensor]:
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


def file_size(path: str) -> int:
    try:
        return int(tf.io.gfile.stat(path).length)
    except tf.errors.NotFoundError:
        raise FileNotFoundError(f"TFRecord file {path} not found") from None


def file_records(path: tf.Tensor, size: tf.Tensor) -> tf.data.Dataset:
    """One file's records as ``(record, path, "")``, plus ``("", path, problem)`` when the file is not read to its end.

    A truncated or corrupt file makes TFRecordDataset raise an error that names no file; reading
    with ``ignore_errors`` and comparing the bytes read with the file size names it instead.
    """
    records = tf.data.TFRecordDataset(path).ignore_errors().map(lambda record: (record, tf.constant(False)))
    end = tf.data.Dataset.from_tensors((tf.constant(""), tf.constant(True)))

    def count_bytes(total: tf.Tensor, element: tuple[tf.Tensor, tf.Tensor]):
        record, is_end = element
        total = total + tf.where(
            is_end, tf.constant(0, tf.int64), tf.cast(tf.strings.length(record), tf.int64) + TFRECORD_OVERHEAD
        )
        problem = tf.where(
            is_end & tf.not_equal(total, size),
            join_text("file ", path, ": truncated or corrupt after byte ", total, " of ", size),
            "",
        )
        return total, (record, is_end, problem)

    stream = records.concatenate(end).scan(tf.constant(0, tf.int64), count_bytes)
    stream = stream.filter(lambda record, is_end, problem: tf.logical_not(is_end) | tf.not_equal(problem, ""))
    return stream.map(lambda record, is_end, problem: (record, path, problem))


def resize(image: tf.Tensor, image_size: int, scale: float = 1.0) -> tf.Tensor:
    """Any size and dtype → float32 [S, S, C] on the 0–255 scale (after dividing by `scale`): area
    averaging when shrinking (no aliasing of fine structures, and cheaper than antialiased bilinear;
    the docs give `bench loader`'s figures), bilinear when enlarging (area would be blocky). Integer images are resized as they
    are, so a full-size image is never cast to float."""
    target = [image_size, image_size]
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    resized = tf.case(
        [
            (tf.equal(height, image_size) & tf.equal(width, image_size), lambda: tf.cast(image, tf.float32)),
            (height >= image_size, lambda: tf.image.resize(image, target, method="area")),
        ],
        default=lambda: tf.image.resize(image, target, method="bilinear"),
    )
    if scale != 1.0:
        resized = resized / scale
    return tf.clip_by_value(resized, 0.0, 255.0)


def to_uint8(image: tf.Tensor) -> tf.Tensor:
    """A float image on the 0–255 scale → uint8, rounded: what the shards store, and what the
    training and evaluation pipelines hand the model (a quarter of float32's bytes to move to the
    accelerator; the model's float32 input casts it back there, inside the compiled step)."""
    return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def decode_resize_sized(png: tf.Tensor, image_size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """One greyscale PNG, 8- or 16-bit → (float32 [S, S, 1] on the 0–255 scale, its decoded [height, width])."""

    # Decoding an 8-bit PNG as uint16 also works (×257) but costs a quarter more time, so look
    # at the IHDR bit depth (byte 24) and decode each kind natively.
    def decode(dtype: tf.DType, scale: float) -> tuple[tf.Tensor, tf.Tensor]:
        image = tf.io.decode_png(png, channels=1, dtype=dtype)
        return resize(image, image_size, scale), tf.shape(image)[:2]

    sixteen_bit = tf.equal(tf.strings.substr(png, 24, 1), b"\x10")
    return tf.cond(sixteen_bit, lambda: decode(tf.uint16, UINT16_TO_UINT8), lambda: decode(tf.uint8, 1.0))


def decode_resize(png: tf.Tensor, image_size: int) -> tf.Tensor:
    """One greyscale PNG, 8- or 16-bit → float32 [S, S, 1] on the 0–255 scale: the per-record kernel of every reader."""
    return decode_resize_sized(png, image_size)[0]


def decode_png_channels(pngs: tf.Tensor, count: int, image_size: int) -> tf.Tensor:
    """[C] greyscale PNG strings → float32 [S, S, C]. Each is resized on its own (same result as
    resizing the stack); channels of unequal sizes fail here, for `channel_problem` to name."""
    decoded = [decode_resize_sized(pngs[i], image_size) for i in range(count)]
    checks = [
        tf.debugging.assert_equal(size, decoded[0][1], message="channels of unequal sizes") for _, size in decoded[1:]
    ]
    with tf.control_dependencies(checks):
        return tf.concat([image for image, _ in decoded], axis=-1)


def decode_stage(
    elements: tf.data.Dataset,
    layout: Layout,
    image_size: int,
    channel_count: int,
    deterministic: bool,
    log: SkipLog | None,
) -> tf.data.Dataset:
    """{"id","label","data","problem"} → (image [S,S,C], label, id), raising or skipping on bad input."""

    def decode(element: dict) -> tuple:
        image = layout.decode(element["data"], image_size)
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
                return join_text("file ", element["source"], ": image ", element["id"], ": its PNG does not decode")

            problem = tf.cond(tf.equal(element["problem"], ""), explain, lambda: element["problem"])
            return tf.zeros([0, 0, channel_count]), element["label"], element["id"], problem

        def decode_or_flag(element: dict) -> tf.data.Dataset:
            decoded = tf.data.Dataset.from_tensors(element).filter(lambda e: tf.equal(e["problem"], ""))
            decoded = decoded.map(decode).ignore_errors()
            return decoded.concatenate(tf.data.Dataset.from_tensors(element).map(flag)).take(1)

        images = elements.interleave(
            decode_or_flag,
            cycle_length=AUTOTUNE,
            block_length=1,
            num_parallel_calls=AUTOTUNE,
            deterministic=deterministic,
        )
    else:
        images = elements.map(
            lambda e: tf.cond(
                tf.equal(e["problem"], ""),
                lambda: decode(e),
                lambda: (tf.zeros([image_size, image_size, channel_count]), e["label"], e["id"], e["problem"]),
            ),
            num_parallel_calls=AUTOTUNE,
            deterministic=deterministic,
        )

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


@as_written
def read(
    layout: Layout, image_size: int, channels: str, with_id: bool, deterministic: bool, log: SkipLog | None
) -> tf.data.Dataset:
    elements = layout.parse(layout.items(), deterministic, image_size)
    images = decode_stage(elements, layout, image_size, len(colors_of(channels)), deterministic, log)
    return _public(images, with_id)
