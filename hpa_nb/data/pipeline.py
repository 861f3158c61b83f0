"""HPA images as tf.data pipelines: the fastest layout of a data folder, the training stream and
the evaluation batches.

Every reader yields ``(image, label)`` or ``(image, label, id)``: ``image`` float32 ``[S, S, C]``
on the 0–255 scale with channels red, green, blue (+ yellow for ``"rgby"``), ``label`` a float32
multi-hot ``[19]``, ``id`` a tf.string. Layouts: compact shards (`hpa_nb.data.shards`), then the
competition's TFRecords and PNG folder (`hpa_nb.data.competition`). Bad input raises an error naming
the file and the ID, or, with ``skip_bad=True``, skips the image and says so on stderr.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from hpa_nb.core.labels import colors_of
from hpa_nb.data import tiles
from hpa_nb.data.augment import augment as augment_image
from hpa_nb.data.bad_input import SkipLog, skip_log
from hpa_nb.data.competition import TFRECORD_PATTERN, png_layout, tfrecord_layout
from hpa_nb.data.reading import AUTOTUNE, Layout, as_written, decode_stage, read, to_uint8
from hpa_nb.data.shards import default_dir, manifest_path, read_manifest, shard_layout

logger = logging.getLogger(__name__)

SHUFFLE_BUFFER = 256


def shard_folder(root: str | Path, channels: str, shards: str | Path | None = None) -> tuple[Path, dict] | None:
    """The folder of compact shards a reader of `root` uses for `channels` and its manifest, or
    None (then TFRecords or PNGs).

    `shards` names one explicitly (for example the attached output of the prepare kernel), which
    must hold the channels asked for; otherwise ``root/shards`` is used when it holds them.
    """
    colors = colors_of(channels)
    if shards is not None:
        manifest = read_manifest(shards)
        if colors_of(manifest["channels"])[: len(colors)] != colors:
            raise ValueError(f"{manifest_path(shards)}: the shards hold {manifest['channels']}, not {channels}")
        return Path(shards), manifest
    shard_dir = default_dir(root)
    if not manifest_path(shard_dir).is_file():
        return None
    manifest = read_manifest(shard_dir)
    if colors_of(manifest["channels"])[: len(colors)] == colors:
        return shard_dir, manifest
    logger.info(f"data: ignoring {shard_dir} ({manifest['channels']} shards, {channels} requested)")
    return None


def choose_layout(
    root: str | Path, channels: str, ids: Iterable[str] | None, log: SkipLog | None, shards: str | Path | None = None
) -> Layout:
    """The fastest layout of `root`: compact shards (`shard_folder`), then competition TFRecords, then PNGs.

    `shards` may also name a folder of cell tiles (`hpa_nb.data.tiles`), read the same way one record per cell."""
    root = Path(root)
    colors = colors_of(channels)
    if shards is not None and tiles.is_tile_folder(shards):  # cell tiles: `ids` are tile keys
        return tiles.tile_layout(Path(shards), tiles.read_manifest(shards), colors, ids)
    found = shard_folder(root, channels, shards)
    if found is not None:
        return shard_layout(*found, colors, ids)
    records = sorted(tf.io.gfile.glob(str(root / "train_tfrecords" / TFRECORD_PATTERN)))
    if records:
        return tfrecord_layout(records, colors, ids)
    if (root / "train.csv").is_file():
        return png_layout(root, colors, ids, log)
    raise FileNotFoundError(f"{root} has no shards/, train_tfrecords/*.tfrec or train.csv")


def describe_layout(root: str | Path, channels: str, shards: str | Path | None = None) -> str:
    """In words, which layout a reader of `root` uses (without listing the images), for a run's summary."""
    if shards is not None and tiles.is_tile_folder(shards):
        manifest = tiles.read_manifest(shards)
        return f"cell tiles {shards} ({manifest['count']} cells of {manifest['images']} images, {manifest['size']} px)"
    found = shard_folder(root, channels, shards)
    if found is not None:
        shard_dir, manifest = found
        return (
            f"compact shards {shard_dir} ({manifest['count']} images, {manifest['size']} px, "
            f"{manifest['channels']}, {manifest['encoding']}) with labels checked against {Path(root) / 'train.csv'}"
        )
    files = tf.io.gfile.glob(str(Path(root) / "train_tfrecords" / TFRECORD_PATTERN))
    if files:
        return f"competition TFRecords ({len(files)} files) in {Path(root) / 'train_tfrecords'}"
    return f"PNG folder {Path(root) / 'train'}"


def read_tfrecords(
    files: str | Path | Sequence[str | Path],
    image_size: int,
    channels: str = "rgb",
    with_id: bool = False,
    deterministic: bool = True,
    ids: Iterable[str] | None = None,
    skip_bad: bool | SkipLog = False,
) -> tf.data.Dataset:
    """Competition TFRecords (one record per channel) → ``(image, label)`` or ``(image, label, id)``.

    `files` is a list of ``.tfrec`` files or a folder of them. Each record is decoded once; an
    image's four records are brought together by ID wherever they sit (see `hpa_nb.data.competition._image_records`
    for the memory bound) and matched by colour, so no record order, and no ``deterministic=False``
    (faster, any interleave), can pair one image's red with another's green. `ids` keeps only those images.
    """
    if isinstance(files, (str, Path)) and Path(files).is_dir():
        files = sorted(tf.io.gfile.glob(str(Path(files) / TFRECORD_PATTERN)))
    elif isinstance(files, (str, Path)):
        files = [files]
    layout = tfrecord_layout([str(f) for f in files], colors_of(channels), ids)
    return read(layout, image_size, channels, with_id, deterministic, skip_log(skip_bad))


def read_png_dir(
    root: str | Path,
    image_size: int,
    channels: str = "rgb",
    with_id: bool = False,
    ids: Iterable[str] | None = None,
    skip_bad: bool | SkipLog = False,
) -> tf.data.Dataset:
    """``root/train.csv`` + ``root/train/{ID}_{color}.png`` → ``(image, label)`` or ``(image, label, id)``.

    Images come in train.csv order. A missing channel file, an ID without images or a bad
    label raises naming the file or ID before anything is read (or is skipped with `skip_bad`).
    """
    log = skip_log(skip_bad)
    layout = png_layout(Path(root), colors_of(channels), ids, log)
    return read(layout, image_size, channels, with_id, True, log)


def open_dataset(
    root: str | Path,
    image_size: int,
    channels: str = "rgb",
    with_id: bool = False,
    ids: Iterable[str] | None = None,
    deterministic: bool = True,
    skip_bad: bool | SkipLog = False,
    shards: str | Path | None = None,
) -> tf.data.Dataset:
    """The images of a data folder through its fastest layout: shards, then TFRecords, then PNGs.

    Prints one line saying which layout it used. `ids` keeps only those images (for a split);
    `shards` names a shard folder outside `root` (see `shard_folder`).
    """
    log = skip_log(skip_bad)
    layout = choose_layout(root, channels, ids, log, shards)
    logger.info(f"data: reading {layout.description}")
    return read(layout, image_size, channels, with_id, deterministic, log)


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
            tf.range(size), seed=tf.random.experimental.stateless_fold_in(seed, window_index)
        )
        return tf.nest.map_structure(lambda values: tf.gather(values, order), batch)

    return elements.batch(window).enumerate().map(permute).unbatch()


def _label_replacer(targets: Mapping[str, np.ndarray]) -> Callable[[dict], dict]:
    """An element map giving each record that `targets` names its target instead of its stored label."""
    keys = tf.constant(list(targets), tf.string)
    rows = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(keys, tf.range(len(targets), dtype=tf.int64)), -1
    )
    matrix = tf.constant(np.stack(list(targets.values())).astype(np.float32))

    def replace(element: dict) -> dict:
        row = rows.lookup(element["id"])
        label = tf.where(row >= 0, tf.gather(matrix, tf.maximum(row, 0)), element["label"])
        return {**element, "label": label}

    return replace


@dataclass(frozen=True)
class Stream:
    """How `training_dataset` draws its endless stream (everything but what is read and at which size)."""

    seed: int = 0  # the pass order, the shuffle windows and each image's augmentation follow it
    augment: bool = True
    cache: bool = False  # keep decoded images in memory (S·S·C·4 bytes each); decoding moves before the cache
    start_batch: int = 0  # begin at this batch of the stream: a resumed run continues where it stopped
    # The hosts of a multi-host run (`hpa_nb.training.hosts`): worker k of n feeds rows k·B/n … (k+1)·B/n - 1 of
    # every global batch of B, and decodes only those.
    num_workers: int = 1
    worker_index: int = 0
    shuffle_buffer: int = SHUFFLE_BUFFER
    deterministic: bool = True
    drop_remainder: bool = True  # a TPU compiles for one static batch shape
    trace: str | None = None  # a file: the ID of every image this worker feeds is appended to it, in order


@as_written
def training_dataset(
    root: str | Path,
    ids: Iterable[str] | None,
    image_size: int,
    channels: str = "rgb",
    batch_size: int = 32,
    stream: Stream = Stream(),
    shards: str | Path | None = None,
    targets: Mapping[str, np.ndarray] | None = None,
) -> tf.data.Dataset:
    """An infinite, shuffled, augmented, batched dataset of ``(image, label)`` for ``model.fit``,
    images as uint8 (`to_uint8`); `stream` says how it is drawn.

    The stream is a sequence of passes over the data, each shuffled with a seed of its own (from
    ``stream.seed`` and the pass number: the file order, then windows of ``shuffle_buffer`` records), and
    each image is augmented with a seed from its position in the stream. So the same seed gives the same
    batches (``deterministic=True``), and ``start_batch=K`` gives exactly the stream from its K-th batch on: a resumed run continues
    where it stopped instead of replaying the first epoch. From shards and PNG folders only
    compressed records are skipped to get there; competition TFRecords are decoded before their
    records are grouped, so there the images skipped (at most one pass) are decoded too. That
    needs `ids` (a pass is ``len(ids)`` images). `targets` (record ID → 19 floats) replaces the stored labels of
    the records it names (a relabelled cell run). With ``cache=True`` decoded images are kept in memory
    (S·S·C·4 bytes each) and decoding moves before the cache.

    With ``stream.num_workers`` n > 1, `batch_size` is the global batch B and this worker yields its B/n rows of
    each: the workers' batches side by side are the one-worker stream's, so no image is fed twice or left out of
    a pass, and a run gives the same batches on any number of hosts. Every worker reads the records (the
    compressed bytes) but decodes only its own rows; with `cache` every worker decodes every image once.
    """
    seed, augment, cache, start_batch = stream.seed, stream.augment, stream.cache, stream.start_batch
    num_workers, worker_index, deterministic = stream.num_workers, stream.worker_index, stream.deterministic
    if not 0 <= worker_index < num_workers:
        raise ValueError(f"worker_index {worker_index} is outside 0..{num_workers - 1}")
    if batch_size % num_workers:
        raise ValueError(f"a global batch of {batch_size} does not split evenly over {num_workers} workers")
    ids = None if ids is None else list(ids)
    if start_batch and ids is None:
        raise ValueError("start_batch needs the image IDs")
    layout = choose_layout(root, channels, ids, None, shards)
    logger.info(f"data: reading {layout.description}")
    channel_count = len(colors_of(channels))
    retarget = _label_replacer(targets) if targets is not None else None
    local = batch_size // num_workers
    start = start_batch * batch_size  # the stream position of the first image yielded (a batch boundary)

    def records(pass_seed: tf.Tensor | None) -> tf.data.Dataset:
        # files: the file order changes every pass.
        items = layout.items()
        if pass_seed is not None:
            items = _stateless_shuffle(items, max(layout.item_count, 1), pass_seed)
        # interleave → parse: cheap string work; an image's records are brought together by ID, so the order can be free.
        elements = layout.parse(items, deterministic, image_size)
        if targets is not None:
            elements = elements.map(retarget, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
        return elements

    def mine(elements: tf.data.Dataset) -> tf.data.Dataset:
        """This worker's rows of every global batch, before they are decoded (the stream starts at `start`)."""
        if num_workers == 1:
            return elements
        rows = elements.enumerate(start=start).filter(lambda index, _: (index % batch_size) // local == worker_index)
        return rows.map(lambda _, element: element)

    def pass_seed(pass_index: tf.Tensor) -> tf.Tensor:
        return tf.random.experimental.stateless_fold_in(tf.constant([seed, 1], tf.int64), pass_index)

    images_per_pass = len(set(ids)) if ids is not None else 0
    first_pass, offset = divmod(start, max(images_per_pass, 1)) if start_batch else (0, 0)
    passes = tf.data.Dataset.range(first_pass, 2**62)
    if cache:
        # decode once into the cache (decoding is the expensive part), then permute the cached images each pass.
        decoded = decode_stage(records(None), layout, image_size, channel_count, deterministic, None).cache()
        window = images_per_pass or stream.shuffle_buffer
        images = mine(passes.flat_map(lambda index: _stateless_shuffle(decoded, window, pass_seed(index))).skip(offset))
    else:
        # shuffle, skip to the start, and only then decode: decoding is the parallel, AUTOTUNEd map, and
        # the shuffle holds compressed records (TFRecords: decoded channels at S px, grouped in `parse`).
        elements = passes.flat_map(
            lambda index: _stateless_shuffle(records(pass_seed(index)), stream.shuffle_buffer, pass_seed(index))
        )
        images = decode_stage(mine(elements.skip(offset)), layout, image_size, channel_count, deterministic, None)
    # augment: stateless, seeded by (seed, position in the whole stream) so a run repeats exactly, on any number of
    # workers: the j-th image of this worker sits at position start + (j // local)·B + worker_index·local + j % local.
    base_seed = tf.constant([seed, 0], tf.int64)

    def position_of(index: tf.Tensor) -> tf.Tensor:
        return start + index // local * batch_size + worker_index * local + index % local

    def augment_element(index: tf.Tensor, element: tuple) -> tuple:
        image, label, _ = element
        if augment:
            image = augment_image(image, tf.random.experimental.stateless_fold_in(base_seed, position_of(index)))
        return to_uint8(image), label

    images = images.enumerate()
    if stream.trace:  # sequential: the file keeps the stream's order
        images = images.map(
            lambda index, element: (index, (*element[:2], _traced(position_of(index), element[2], stream.trace)))
        )
    images = images.map(augment_element, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    # batch with drop_remainder: a TPU compiles for one static batch shape.
    images = images.batch(local, drop_remainder=stream.drop_remainder)
    # prefetch: decode the next batches while the accelerator runs this one.
    return images.prefetch(AUTOTUNE)


def _traced(position: tf.Tensor, image_id: tf.Tensor, path: str) -> tf.Tensor:
    """`image_id`, after appending ``POSITION ID`` as a line to the file at `path` (`read_trace` reads them)."""
    line = tf.strings.join([tf.strings.as_string(position), image_id], separator=" ")
    with tf.control_dependencies([tf.print(line, output_stream=f"file://{path}")]):
        return tf.identity(image_id)


def read_trace(path: str | Path) -> list[str]:
    """The IDs a traced stream (`Stream.trace`) fed, in the stream's order: one per position. An iterator started
    and dropped traces the stream's first images again (Keras's `fit` starts one to build a new model's metrics,
    and prefetching runs it ahead), so a position can come twice; it must hold the same ID each time."""
    fed: dict[int, str] = {}
    for line in Path(path).read_text().splitlines():
        position, image_id = line.split()
        if fed.setdefault(int(position), image_id) != image_id:
            raise ValueError(f"{path}: position {position} fed {fed[int(position)]} and then {image_id}")
    return [fed[position] for position in sorted(fed)]


@as_written
def eval_dataset(
    root: str | Path,
    ids: Iterable[str] | None,
    image_size: int,
    channels: str = "rgb",
    batch_size: int = 32,
    with_id: bool = True,
    cache: bool = False,
    shards: str | Path | None = None,
) -> tf.data.Dataset:
    """A finite, ordered, batched dataset of uint8 images without augmentation; the last partial batch is kept.

    With ``cache=True`` the decoded images are kept in memory after the first pass (S·S·C
    bytes each), so a validation set is read and decoded once, not every epoch.
    """
    images = open_dataset(root, image_size, channels, with_id=with_id, ids=ids, deterministic=True, shards=shards)
    images = images.map(lambda image, *rest: (to_uint8(image), *rest), num_parallel_calls=AUTOTUNE)
    if cache:
        images = images.cache()
    return images.batch(batch_size, drop_remainder=False).prefetch(AUTOTUNE)
