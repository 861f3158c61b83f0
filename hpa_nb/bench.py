"""Benchmarks behind ``python -m hpa_nb bench``: the input pipeline (`loader`), training steps (`train`) and the
per-image cell work on every core (`cells`).

Speed is measured here, never in tests. Each benchmark prints a table and ends with one JSON
line that scripts (and the docs) can quote.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from hpa_nb.cells.scoring import CellClassifier
from hpa_nb.cells.submit import write_submission
from hpa_nb.core.labels import COLORS, N_CLASSES, colors_of
from hpa_nb.core.workers import available_cores, resolve
from hpa_nb.data import competition, reading, shards
from hpa_nb.data import pipeline as data
from hpa_nb.data.competition import encode_record, load_labels, write_tfrecord
from hpa_nb.data.tiles import write_tiles
from hpa_nb.sample.writer import write_sample
from hpa_nb.training.accelerator import detect
from hpa_nb.training.batch_norm import batch_norm_layers, recalibrate
from hpa_nb.training.model import WeightedBinaryCrossentropy, build

logger = logging.getLogger(__name__)

# Images per generated TFRecord file when a data folder has only PNGs (the competition packs ~20 per file).
IMAGES_PER_TFRECORD = 16
SHARD_SIZE = 512
BATCH = 16  # readers are timed batched, so Python's per-element overhead does not blur the comparison
WARMUP_BATCHES = 2


def _baseline_reader(files: list[str], image_size: int, channels: str):
    """The baseline notebook's reader, for comparison only: decode every record, filter the
    stream four times by colour and zip the four streams (so each record is decoded four
    times, and with ``ignore_order`` channels of different images get paired)."""

    features = {name: tf.io.FixedLenFeature([], tf.string) for name in ("image", "image_name", "target")}

    def make_example(serialized):
        parsed = tf.io.parse_single_example(serialized, features)
        image = tf.cast(
            tf.image.resize(tf.image.decode_png(parsed["image"], channels=1), [image_size, image_size]), tf.float32
        )
        indices = tf.strings.to_number(tf.strings.split(parsed["target"], sep="|"), out_type=tf.int32)
        label = tf.reduce_max(tf.one_hot(indices, depth=N_CLASSES), axis=-2)
        return image, parsed["image_name"], label

    options = tf.data.Options()
    options.experimental_deterministic = False  # the baseline's ignore_order=True, as used for training
    dataset = tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE).with_options(options)
    dataset = dataset.map(make_example, num_parallel_calls=tf.data.AUTOTUNE)
    streams = [
        dataset.filter(lambda image, name, label, color=color: tf.strings.regex_full_match(name, f".*{color}.*"))
        for color in ("red", "green", "blue", "yellow")
    ]
    count = len(channels)

    def combine(*parts):
        image = tf.stack([parts[i][0][..., 0] for i in range(count)], axis=-1)
        return image, parts[0][2]

    return tf.data.Dataset.zip(tuple(streams)).map(combine, num_parallel_calls=tf.data.AUTOTUNE)


def _write_competition_tfrecords(root: Path, out: Path) -> list[str]:
    """Pack a PNG folder into competition-format TFRecords (one record per channel, colours shuffled)."""
    frame = load_labels(root)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    files = []
    for start in range(0, len(frame), IMAGES_PER_TFRECORD):
        rows = frame[start : start + IMAGES_PER_TFRECORD]
        records = (
            encode_record(f"{image_id}_{color}", (root / "train" / f"{image_id}_{color}.png").read_bytes(), label)
            for image_id, label in zip(rows["ID"], rows["Label"])
            for color in rng.sample(COLORS, len(COLORS))
        )
        files.append(str(write_tfrecord(out / f"{start // IMAGES_PER_TFRECORD:03d}.tfrec", records)))
    return files


def _floor_reader(files: list[str], image_size: int, channels: str):
    """The physical floor of a competition-TFRecord reader: each wanted record parsed, decoded and
    resized once, by the same kernel `read_tfrecords` uses, with nothing else (no grouping by
    image, no checks). Every `len(channels)` consecutive records count as one image."""

    wanted = tf.constant(colors_of(channels))
    features = {name: tf.io.FixedLenFeature([], tf.string) for name in ("image", "image_name")}
    options = tf.data.Options()
    options.deterministic = False
    records = tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE).with_options(options)
    records = records.map(
        lambda record: tf.io.parse_single_example(record, features), num_parallel_calls=tf.data.AUTOTUNE
    )
    records = records.filter(
        lambda parsed: tf.reduce_any(tf.equal(tf.strings.regex_replace(parsed["image_name"], r"^.*_", ""), wanted))
    )
    decoded = records.map(
        lambda parsed: reading.decode_resize(parsed["image"], image_size), num_parallel_calls=tf.data.AUTOTUNE
    )
    return decoded.batch(len(channels)).map(lambda image: (image, tf.zeros([0])))


def _images_per_second(make_dataset: Callable[[], object], seconds: float) -> tuple[float, int]:
    """Images per second over about `seconds`, after a warm-up (tracing, thread start-up).

    The data repeats, so a pass lasts `seconds` however few images there are."""
    dataset = make_dataset().repeat().batch(BATCH)
    iterator = iter(dataset)
    for _ in range(WARMUP_BATCHES):
        next(iterator)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        images += int(next(iterator)[0].shape[0])
    return images / (time.perf_counter() - start), images


def loader(
    data_dir: str | Path | None = None,
    image_size: int = 256,
    channels: str = "rgb",
    generate_size: int | None = None,
    images: int = 48,
    seconds: float = 10.0,
    shard_size: int = SHARD_SIZE,
    bit_depth: int = 8,
    rounds: int = 3,
) -> dict:
    """Images/s of four readers on the same files in one process: the baseline's filter-and-zip
    reader, the decode-once floor (`_floor_reader`), `read_tfrecords`, and compact shards at
    `shard_size` px resized to `image_size`.

    Each reader is timed for `seconds` per round, readers take turns within a round, and each
    figure is the median of `rounds` rounds (machine load drifts; interleaving spreads it evenly).
    With `generate_size`, a temporary sample of `images` images at that size and `bit_depth` is
    written first (the default sample's 256 px images make PNG decoding unrealistically cheap;
    the competition's are 1728–3072 px, 16-bit in train/). Preparation (sample, TFRecords,
    shards) is not timed. Returns the results.
    """

    with tempfile.TemporaryDirectory(prefix="hpa_bench_") as scratch_name:
        scratch = Path(scratch_name)
        if generate_size:
            logger.info(f"bench: writing a {images}-image {bit_depth}-bit sample at {generate_size} px (not timed)")
            data_dir = write_sample(
                scratch / "sample",
                images=images,
                size=generate_size,
                seed=0,
                test_images=0,
                bit_depth=bit_depth,
                progress=False,
            )
        if data_dir is None:
            raise ValueError("bench loader needs --data or --size")
        data_dir = Path(data_dir)
        files = sorted(str(p) for p in (data_dir / "train_tfrecords").glob(competition.TFRECORD_PATTERN))
        if not files:
            logger.info(f"bench: packing {data_dir}/train into competition TFRecords (not timed)")
            files = _write_competition_tfrecords(data_dir, scratch / "train_tfrecords")
        shard_root = scratch / "shard_root"
        logger.info(f"bench: writing {shard_size} px shards (not timed)")
        manifest = shards.write_shards(
            data_dir, shards.default_dir(shard_root), size=shard_size, channels=channels, progress=False
        )
        readers = {
            "baseline filter+zip": lambda: _baseline_reader(files, image_size, channels),
            "floor (decode once)": lambda: _floor_reader(files, image_size, channels),
            "read_tfrecords": lambda: data.read_tfrecords(files, image_size, channels, deterministic=False),
            f"shards {shard_size} px": lambda: data.open_dataset(shard_root, image_size, channels, deterministic=False),
        }
        rates: dict[str, list[float]] = {name: [] for name in readers}
        for round_index in range(rounds):
            for name, make in readers.items():
                rate, count = _images_per_second(make, seconds)
                rates[name].append(rate)
                logger.info(f"bench: round {round_index + 1}/{rounds}: {name}: {rate:.1f} images/s ({count} images)")
    results = {name: median(values) for name, values in rates.items()}
    baseline, floor = results["baseline filter+zip"], results["floor (decode once)"]
    print(f"\n{'reader':<24}{'images/s':>10}{'× baseline':>12}{'of floor':>10}   (median of {rounds} rounds)")
    for name, rate in results.items():
        print(f"{name:<24}{rate:>10.1f}{rate / baseline:>12.2f}{100 * rate / floor:>9.0f}%")
    summary = {
        "bench": "loader",
        "data": str(data_dir if not generate_size else f"generated {generate_size} px"),
        "images": manifest["count"],
        "bit_depth": bit_depth if generate_size else None,
        "image_size": image_size,
        "channels": channels,
        "shard_size": shard_size,
        "cpu_count": os.cpu_count(),
        "seconds_per_pass": seconds,
        "rounds": rounds,
        "images_per_second": {name: round(rate, 1) for name, rate in results.items()},
        "all_rounds": {name: [round(rate, 1) for rate in values] for name, values in rates.items()},
        "speedup": {name: round(rate / baseline, 2) for name, rate in results.items()},
        "of_floor": {name: round(rate / floor, 3) for name, rate in results.items()},
    }
    print(json.dumps(summary))
    return summary


# --- train (model developer) --------------------------------------------------------------
def _steady_images_per_second(
    model, dataset, batch_size: int, steps: int, warmup_steps: int, steps_per_execution: int = 1
) -> float:
    """Training images/s over `steps` steps of one ``fit``, after `warmup_steps` (compilation, pipeline start)."""

    class StepClock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.marks: list[tuple[int, float]] = []  # (last step of the execution, time)

        def on_train_batch_end(self, batch, logs=None):
            self.marks.append((batch, time.perf_counter()))

    # Keras calls on_train_batch_end once per execution (at its last step), so round both phases
    # up to whole executions: then one execution ends exactly where the warm-up does.
    warmup_steps = -(-max(1, warmup_steps) // steps_per_execution) * steps_per_execution
    steps = -(-steps // steps_per_execution) * steps_per_execution
    clock = StepClock()
    model.fit(dataset, epochs=1, steps_per_epoch=warmup_steps + steps, callbacks=[clock], verbose=0, shuffle=False)
    timed = [(step, moment) for step, moment in clock.marks if step >= warmup_steps - 1]
    (first_step, start), (last_step, end) = timed[0], timed[-1]
    return (last_step - first_step) * batch_size / (end - start)


def eager_recalibration(model, dataset, steps: int) -> int:
    """Batch-norm re-estimation as `hpa_nb.training.batch_norm.recalibrate` did it before it was compiled, for comparison:
    eager training-mode calls on unsharded batches, momentum ``k/(k+1)`` at the k-th batch."""
    layers = batch_norm_layers(model)
    momenta = [layer.momentum for layer in layers]
    used = 0
    try:
        for batch in dataset.take(steps).as_numpy_iterator():
            for layer in layers:
                layer.momentum = used / (used + 1)
            model(batch[0], training=True)
            used += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return used


def _recalibration_seconds(model, dataset, steps: int, rounds: int = 3) -> dict[str, float]:
    """Median seconds of eager and compiled batch-norm re-estimation over `steps` batches, interleaved."""

    batches = list(dataset.take(steps).as_numpy_iterator())  # both read the same batches, already decoded
    ways = {"eager (before)": eager_recalibration, "compiled (now)": recalibrate}
    recalibrate(model, batches[:1], 1)  # compile outside the timing, as training's first epoch does
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, way in ways.items():
            start = time.perf_counter()
            way(model, _Batches(batches), steps)
            times[name].append(time.perf_counter() - start)
    return {name: median(values) for name, values in times.items()}


class _Batches(list):
    """A list of batches that answers ``take(n).as_numpy_iterator()`` like a tf.data pipeline."""

    def take(self, count: int) -> "_Batches":
        return _Batches(self[:count])

    def as_numpy_iterator(self):
        return iter(self)


def train(
    data_dir: str | Path,
    image_size: int = 256,
    channels: str = "rgb",
    backbone: str = "tiny",
    batch_size: int = 16,
    steps: int = 10,
    warmup_steps: int = 3,
    bn_steps: int = 20,
) -> dict:
    """Training images/s fed by the project's input pipeline against the same model fed from memory.

    The pipeline is `hpa_nb.data.pipeline.training_dataset` (decode, resize, augment, batch, prefetch),
    streaming (decoding every step, as full-size training does) and with ``cache=True`` (decoded
    once, then only augmented, as ``--quick`` does; timed after one pass fills the cache). The
    in-memory feed repeats a few batches already decoded, so it costs nothing. The ratio says
    whether input is the bottleneck (target: at least 90%). On a CPU the pipeline and the model
    share the same cores, so this is the hardest case. Then the cost of one batch-norm
    re-estimation (`hpa_nb.training.batch_norm`, over `bn_steps` batches) beside one epoch's time, eager as
    it was and compiled as it is now (median of 3 interleaved runs). Returns the results.
    """

    accelerator = detect()
    root = Path(data_dir)
    ids = [str(image_id) for image_id in load_labels(root)["ID"]]
    global_batch = accelerator.global_batch_size(batch_size)

    def pipeline(cache: bool):
        return data.training_dataset(
            root,
            ids,
            image_size,
            channels,
            batch_size=global_batch,
            stream=data.Stream(seed=0, augment=True, cache=cache),
        )

    held = list(pipeline(False).take(4))  # decoded once, outside the timing
    in_memory = tf.data.Dataset.from_tensor_slices((tf.stack([b[0] for b in held]), tf.stack([b[1] for b in held])))
    in_memory = in_memory.cache().repeat().prefetch(tf.data.AUTOTUNE)
    with accelerator.scope():
        model = build(backbone, image_size, channels, weights=None)
        # At most the timed steps per execution, so the timing spans at least one whole execution.
        steps_per_execution = min(accelerator.steps_per_execution, steps)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-4),
            loss=WeightedBinaryCrossentropy(),
            steps_per_execution=steps_per_execution,
        )
    logger.info(
        f"bench: {backbone} at {image_size} px, {channels}, global batch {global_batch} on "
        f"{accelerator.describe()}; {steps} timed steps after {warmup_steps} warm-up"
    )
    fill_cache = -(-len(ids) // global_batch)  # steps of one pass
    feeds = {
        "in memory": (in_memory, warmup_steps),
        "pipeline, cached": (pipeline(True), fill_cache + warmup_steps),
        "pipeline, streaming": (pipeline(False), warmup_steps),
    }
    results = {}
    for name, (dataset, warmup) in feeds.items():
        results[name] = _steady_images_per_second(model, dataset, global_batch, steps, warmup, steps_per_execution)
        logger.info(f"bench: {name}: {results[name]:.1f} images/s")
    print(f"\n{'feed':<22}{'images/s':>10}{'% of memory':>13}")
    for name, rate in results.items():
        print(f"{name:<22}{rate:>10.1f}{100 * rate / results['in memory']:>12.0f}%")
    fractions = {name: rate / results["in memory"] for name, rate in results.items() if name != "in memory"}
    for name, fraction in fractions.items():
        verdict = "input keeps up" if fraction >= 0.9 else "input is the bottleneck"
        print(f"{name}: {fraction:.0%} of in-memory ({verdict}; target >= 90%)")
    epoch_steps = max(1, len(ids) // global_batch)
    epoch_seconds = epoch_steps * global_batch / results["in memory"]
    recalibration = _recalibration_seconds(model, pipeline(False), bn_steps)
    print(
        f"\nbatch-norm re-estimation over {bn_steps} batches, once per epoch of {epoch_steps} steps "
        f"({epoch_seconds:.2f} s fed from memory):"
    )
    for name, seconds in recalibration.items():
        print(f"  {name:<16}{seconds:>8.2f} s  ({100 * seconds / epoch_seconds:.0f}% of the epoch)")
    summary = {
        "bench": "train",
        "data": str(root),
        "images": len(ids),
        "backbone": backbone,
        "image_size": image_size,
        "channels": channels,
        "global_batch_size": global_batch,
        "steps": steps,
        "steps_per_execution": steps_per_execution,
        "backend": accelerator.backend,
        "device": accelerator.device_kind,
        "replicas": accelerator.replicas,
        "cpu_count": os.cpu_count(),
        "images_per_second": {name: round(rate, 1) for name, rate in results.items()},
        "pipeline_fraction": {name: round(fraction, 3) for name, fraction in fractions.items()},
        "epoch_seconds": round(epoch_seconds, 3),
        "bn_steps": bn_steps,
        "bn_recalibration_seconds": {name: round(value, 3) for name, value in recalibration.items()},
    }
    print(json.dumps(summary))
    return summary


def cells(images: int = 12, size: int = 2048, workers: int | None = None, rounds: int = 3, tile_size: int = 96) -> dict:
    """Per-image cell work with one worker and with `workers` (default: every core this process may use): cutting
    tiles (`write_tiles`: read, segment, cut, encode) and scoring a submission (`write_submission`: read, segment,
    cut and encode the masks in the workers; the classifier in this process), once with a stand-in classifier (a
    fixed function of the pixels: the per-image work alone) and once with the tiny CNN untrained (its forward
    passes in this process share the cores), on `images` generated `size` px 16-bit RGBY images. Each figure is the median of `rounds` interleaved rounds, after one untimed
    round of each (the worker pool's fork server imports TensorFlow once). Checks that the outputs are identical."""
    count = resolve(workers)
    with tempfile.TemporaryDirectory(prefix="hpa-bench-cells-") as folder:
        root = Path(folder)
        logger.info(f"generating {images} training and {images} test images of {size} px (16-bit RGBY)...")
        write_sample(root / "data", images=images, size=size, seed=5, bit_depth=16, test_images=images, progress=False)
        model = CellClassifier.from_keras(build("tiny", 64, "rgby", weights=None), 64, "rgby")
        stand_in = CellClassifier(_pixel_means, 64, "rgby")  # no model: the per-image work alone
        jobs = {
            "tiles": lambda w, out: write_tiles(
                root / "data", out, size=tile_size, encoding="png", workers=w, progress=False
            ),
            "submit, no model": lambda w, out: write_submission(
                stand_in, root / "data", out / "submission.csv", progress=False, workers=w
            ),
            "submit, tiny CNN": lambda w, out: write_submission(
                model, root / "data", out / "submission.csv", progress=False, workers=w
            ),
        }
        seconds: dict[tuple[str, int], list[float]] = {(job, w): [] for job in jobs for w in (1, count)}
        for round_index in range(rounds + 1):
            for job, run in jobs.items():
                for w in (1, count):
                    out = root / _slug(job, w, round_index)
                    out.mkdir()
                    started = time.perf_counter()
                    run(w, out)
                    if round_index:  # the first round warms up (and checks), untimed
                        seconds[(job, w)].append(time.perf_counter() - started)
        identical = {job: _same_files(root / _slug(job, 1, 0), root / _slug(job, count, 0)) for job in jobs}
    results = {}
    print(
        f"\n{'job':<18}{'workers':>8}{'images/s':>10}{'× 1 worker':>12}   (median of {rounds} rounds, {images} "
        f"images of {size} px)"
    )
    for job in jobs:
        rates = {w: images / median(seconds[(job, w)]) for w in (1, count)}
        results[job] = {
            "workers": count,
            "images_per_second_1": rates[1],
            "images_per_second": rates[count],
            "ratio": rates[count] / rates[1],
            "identical": identical[job],
        }
        for w in (1, count):
            print(f"{job:<18}{w:>8}{rates[w]:>10.2f}{rates[w] / rates[1]:>12.2f}")
    print(
        "outputs identical with 1 and "
        + f"{count} workers: "
        + ", ".join(f"{job} {'yes' if same else 'NO'}" for job, same in identical.items())
    )
    print(
        json.dumps(
            {"bench": "cells", "images": images, "size": size, "rounds": rounds, "cores": available_cores(), **results}
        )
    )
    return results


def _slug(job: str, workers: int, round_index: int) -> str:
    return f"{job.replace(',', '').replace(' ', '-')}-{workers}-{round_index}"


def _pixel_means(batch: np.ndarray) -> np.ndarray:
    """A stand-in classifier: each class's score a fixed function of the batch's channel means."""
    means = batch.reshape(len(batch), -1, batch.shape[-1]).mean(axis=1) / 255.0
    return np.clip(np.tile(means, (1, 5))[:, :N_CLASSES], 0.0, 1.0).astype(np.float32)


def _same_files(first: Path, second: Path) -> bool:
    """Whether two folders hold the same file names with the same bytes."""
    names = sorted(path.name for path in first.iterdir())
    return names == sorted(path.name for path in second.iterdir()) and all(
        (first / name).read_bytes() == (second / name).read_bytes() for name in names
    )
