"""The data a run feeds: training (infinite, augmented, resumable at a batch), validation (finite, padded to the
devices) and batch-norm re-estimation, each this host's rows of every global batch (`hpa_nb.data.pipeline`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

from hpa_nb.data import pipeline
from hpa_nb.data.reading import as_written
from hpa_nb.training import hosts as hosting
from hpa_nb.training.config import TrainConfig
from hpa_nb.training.hosts import Hosts


@dataclass(frozen=True)
class Feeds:
    """The three datasets a run reads, each this host's rows of every global batch."""

    train: tf.data.Dataset  # endless, augmented, resumable at a batch: (images, labels)
    val: tf.data.Dataset  # one pass, padded to the devices: (images, labels, weights) on several
    recalibration: tf.data.Dataset  # training images without augmentation, for batch-norm re-estimation


def records_of(config: TrainConfig) -> str | None:
    """What the data layer reads besides data_dir: the cell tiles of a cell run, else the shards (if any)."""
    return config.cells.tiles if config.cells.level == "cell" else config.data.shards


def pad_batches(dataset, multiple: int):
    """(image, label) batches → (image, label, weight) batches padded to a multiple of `multiple` rows.

    JAX's DataParallel shards every batch evenly over the devices, and TF's MirroredStrategy hands
    empty batches to some replicas otherwise (which a convolution can fail on), so a validation
    set's last partial batch is padded; the padding rows get weight 0 and change no metric.
    """

    def pad(images, labels):
        count = tf.shape(images)[0]
        missing = (multiple - count % multiple) % multiple
        weights = tf.concat([tf.ones([count]), tf.zeros([missing])], axis=0)
        images = tf.pad(images, [[0, missing], [0, 0], [0, 0], [0, 0]])
        labels = tf.pad(labels, [[0, missing], [0, 0]])
        return images, labels, weights

    return dataset.map(pad)


@as_written
def datasets(
    root: Path,
    train_ids: list[str],
    val_ids: list[str],
    config: TrainConfig,
    global_batch: int,
    replicas: int,
    start_batch: int,
    targets: dict | None = None,
    hosts: Hosts = Hosts(),
) -> Feeds:
    """Training (infinite, augmented, from `start_batch` on), validation (finite, padded) and BN re-estimation data:
    this host's rows of every global batch."""

    common = {
        "image_size": config.data.image_size,
        "channels": config.data.channels,
        "batch_size": global_batch,
        "shards": records_of(config),
    }
    workers = {"num_workers": hosts.count, "worker_index": hosts.index}
    trace = hosting.trace_path(hosts)
    stream = pipeline.Stream(
        seed=config.data.seed,
        augment=config.data.augment,
        cache=config.data.cache,
        start_batch=start_batch,
        trace=None if trace is None else str(trace),
        **workers,
    )
    train_data = pipeline.training_dataset(root, train_ids, stream=stream, targets=targets, **common)
    val_bytes = len(val_ids) * config.data.image_size**2 * len(config.data.channels)  # uint8 images
    val_data = pipeline.eval_dataset(
        root, val_ids, with_id=False, cache=val_bytes <= config.validation.val_cache_gib * 2**30, **common
    )
    # A known length keeps Keras from warning "ran out of data" after every validation pass.
    val_data = val_data.apply(tf.data.experimental.assert_cardinality(math.ceil(len(val_ids) / global_batch)))
    if replicas > 1:
        val_data = hosting.local_rows(pad_batches(val_data, replicas), hosts)
    # BN statistics are for inference inputs: training images without augmentation.
    unaugmented = pipeline.Stream(seed=config.data.seed + 1, augment=False, **workers)
    recalibration_data = pipeline.training_dataset(root, train_ids, stream=unaugmented, **common)
    return Feeds(train_data, val_data, recalibration_data)
