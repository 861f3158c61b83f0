"""Training: `prepare(config)` builds a `Plan` (checks, accelerator, split, data, compiled model) from a
`hpa_nb.training.config.TrainConfig`, and `fit(plan)` trains it into a run folder (`hpa_nb.training.run`)."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from hpa_nb.core.env import on_kaggle, working_dir
from hpa_nb.core.files import atomic_path
from hpa_nb.core.labels import class_weights, label_matrix, parse_label
from hpa_nb.data import combined, pipeline, shards, tiles
from hpa_nb.data.competition import load_labels
from hpa_nb.data.splits import holdout
from hpa_nb.sample.sources import find_data, source_record
from hpa_nb.training import callbacks, inputs, predictions, preflight, run, schedule, tracking
from hpa_nb.training import hosts as hosting
from hpa_nb.training.accelerator import detect
from hpa_nb.training.batch_norm import recalibrate
from hpa_nb.training.config import TrainConfig, validate
from hpa_nb.training.hosts import Hosts
from hpa_nb.training.model import WeightedBinaryCrossentropy, build, make_metrics
from hpa_nb.training.presets import register_classes

MONITOR = "val_auc"  # early stopping and "best epoch" follow the validation macro ROC AUC


@dataclass
class TrainResult:
    """What `train` returns: the run folder, the trained model and its per-epoch history."""

    run_dir: Path
    model: Any = field(repr=False)
    history: Any = field(repr=False)  # pandas DataFrame of history.csv
    final: dict = field(default_factory=dict)  # validation metrics of the saved model (after BN re-estimation)
    stopped_at_deadline: bool = False  # True when the deadline ended it before its last epoch: resume to finish


# --- split --------------------------------------------------------------------------------
def image_split(
    root: Path, run_dir: Path, config: TrainConfig, reuse: bool
) -> tuple[list[str], list[str], pd.DataFrame]:
    """The image-level train / validation IDs a run uses, and the labels they come from, without writing anything:
    the saved split when resuming, else `config.split_from`'s, else a stratified split by `config.seed` (fold
    `config.fold` of `config.folds` when set), the images of extra data sources on the training side."""
    frame = load_labels(root)
    found = pipeline.shard_folder(root, config.channels, config.shards)
    if found is not None:  # shards written elsewhere: only the images they hold, and only if they match train.csv
        frame = shards.pair(*found, frame, root)
    ids = frame["ID"].tolist()
    if reuse and run.RunFolder(run_dir).split.is_file():
        saved = run.load_split(run_dir)
    elif config.split_from:
        saved = run.load_split(config.split_from)
        unknown = sorted(set(saved["train"] + saved["val"]) - set(ids))
        if unknown:
            raise ValueError(f"split_from {config.split_from}: image {unknown[0]} is not in {root}/train.csv")
    else:
        train_ids, val_ids = holdout(
            ids,
            label_matrix(ids, frame["Label"]),
            config.val_fraction,
            config.seed,
            config.folds,
            config.fold,
            train_only=combined.extra_ids(root),
        )
        saved = {"train": train_ids, "val": val_ids}
    if not saved["train"] or not saved["val"]:
        raise ValueError(f"split of {len(ids)} images in {root} left an empty train or validation subset")
    return list(saved["train"]), list(saved["val"]), frame


def _split(
    root: Path, run_dir: Path, config: TrainConfig, reuse: bool, writer: bool = True
) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Train / validation IDs (`image_split`, written to the run's split.csv) and their label matrices. Every host
    but the writer reads the split that the writer wrote."""
    if not writer and not run.RunFolder(run_dir).split.is_file():
        raise FileNotFoundError(
            f"{run.RunFolder(run_dir).split}: host 0 wrote it and this host does not see it; the "
            "run folder must be one folder that every host sees (a bucket or NFS share)"
        )
    train_ids, val_ids, frame = image_split(root, run_dir, config, reuse or not writer)
    if writer:
        run.write_split(run_dir, train_ids, val_ids)
    if config.level == "cell":
        return _cell_split(root, config, frame, train_ids, val_ids)
    ids = frame["ID"].tolist()
    matrix = label_matrix(ids, frame["Label"])
    return train_ids, val_ids, _rows(train_ids, ids, matrix), _rows(val_ids, ids, matrix)


def _cell_split(
    root: Path, config: TrainConfig, frame, train_ids: list[str], val_ids: list[str]
) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """The image split carried over to the tiles: every cell of an image on its image's side, with the
    image's label as its weak target. Tiles from other data stop the run; images the tiles lack (skipped
    as bad when they were written) are left out with a warning."""
    where = tiles.manifest_path(config.tiles)
    manifest = tiles.read_manifest(config.tiles)
    if not manifest["complete"]:
        raise ValueError(
            f"{where}: the tiles are incomplete ({manifest['images']} images; their run stopped at "
            "its deadline): run it again to finish them"
        )
    held = tiles.image_labels(manifest)
    truth = dict(zip(frame["ID"], frame["Label"]))
    for image_id, label in held.items():
        if image_id not in truth or not np.array_equal(
            parse_label(label, image_id), parse_label(truth[image_id], image_id)
        ):
            raise ValueError(
                f"{where}: image {image_id} with label '{label}' in the tiles is not so in "
                f"{root}/train.csv: the tiles were written from other data"
            )
    missing = [image_id for image_id in train_ids + val_ids if image_id not in held]
    if missing:
        print(
            f"warning: {len(missing)} images of the split have no tiles (skipped as bad when the tiles were "
            f"written, e.g. {missing[0]}); training leaves them out",
            file=sys.stderr,
        )
    keys = {side: tiles.tile_keys(manifest, ids) for side, ids in (("train", train_ids), ("val", val_ids))}
    image_of = {key: key.rpartition("_")[0] for side_keys in keys.values() for key in side_keys}

    def matrix(side_keys: list[str]) -> np.ndarray:
        return label_matrix(side_keys, [held[image_of[key]] for key in side_keys])

    return keys["train"], keys["val"], matrix(keys["train"]), matrix(keys["val"])


def _rows(ids: list[str], all_ids: list[str], matrix: np.ndarray) -> np.ndarray:
    position = {image_id: index for index, image_id in enumerate(all_ids)}
    return matrix[[position[image_id] for image_id in ids]]


# --- datasets -----------------------------------------------------------------------------
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


# --- the run folder's checkpoints, history and resume ---------------------------------------
def load_checkpoint(path: Path):
    """A checkpoint with its optimizer, in any process: the classes it names are registered first."""

    return keras.saving.load_model(path)


# --- prepare, then fit --------------------------------------------------------------------
def learning_rate_schedule(config: TrainConfig, steps_per_epoch: int, global_batch: int):
    """The warmup → sustain → decay schedule training uses, for a run of `config` (plotted in 03_train)."""
    return schedule.from_epochs(
        steps_per_epoch,
        global_batch,
        max_lr=config.max_lr,
        initial_lr=config.initial_lr,
        warmup_epochs=config.warmup_epochs,
        sustain_epochs=config.sustain_epochs,
        decay=config.lr_decay,
        min_lr=config.min_lr,
    )


@dataclass
class Plan:
    """Everything `fit` needs, built once by `prepare`: a notebook can show each part before training."""

    config: TrainConfig  # resolved: data_dir and resume are as the run uses them
    run_dir: Path
    accelerator: Any
    train_ids: list[str]
    val_ids: list[str]
    train_labels: np.ndarray  # [train images, 19]
    global_batch: int
    steps_per_epoch: int
    steps_per_execution: int
    schedule: Any  # the learning rate per optimizer step
    model: Any  # compiled; on resume, loaded from the last checkpoint
    finished_epochs: int  # 0 for a fresh run
    datasets: dict = field(repr=False)  # "train", "val" and "recalibration"
    runtime: dict = field(repr=False)  # what config.json records beside the options
    layout: str = ""  # which layout the images come from, in words
    root: Path | None = None  # the folder read: data_dir, or the view of several sources (`data_root`)

    @property
    def hosts(self) -> Hosts:
        return self.accelerator.hosts

    def summary(self) -> str:
        """What the run will do, in a few lines."""
        start = f"resuming after epoch {self.finished_epochs}" if self.finished_epochs else "a fresh run"
        return "\n".join(
            [
                f"accelerator: {self.accelerator.describe()}",
                *(
                    [
                        f"hosts: {self.hosts.describe()}, feeding {self.accelerator.local_batch_size(self.global_batch)} "
                        f"of each {self.global_batch} images"
                    ]
                    if self.hosts.several
                    else []
                ),
                f"data: {self.layout}",
                f"split: {len(self.train_ids)} training and {len(self.val_ids)} validation "
                f"{'cells (tiles, split by image)' if self.config.level == 'cell' else 'images'}",
                f"steps: global batch {self.global_batch}, {self.steps_per_epoch} steps per epoch, "
                f"{self.steps_per_execution} per compiled call",
                f"run: {self.run_dir} ({start}, {self.config.epochs} epochs)",
            ]
        )


def whole_executions(steps_per_epoch: int, steps_per_execution: int, explicit: bool = False) -> tuple[int, int]:
    """(steps per epoch, steps per compiled call), the first a multiple of the second.

    Keras 3 on JAX runs a whole compiled call even when fewer steps are left in the epoch (5 steps
    in calls of 2 train 6), which would shift the learning-rate schedule, the data stream a resumed
    run starts from and the step counts. So an epoch is rounded down to whole calls; the stream
    runs on across epochs, so no image is left out, only the epoch boundary moves.
    """
    steps_per_execution = max(1, min(steps_per_execution, steps_per_epoch))
    rounded = steps_per_epoch - steps_per_epoch % steps_per_execution
    if rounded != steps_per_epoch and explicit:
        print(
            f"train: {rounded} steps per epoch, not {steps_per_epoch}: a whole number of compiled calls of "
            f"{steps_per_execution} steps",
            file=sys.stderr,
        )
    return rounded, steps_per_execution


# Options a resumed run must share with the run it continues: they shape the model, its inputs or its split.
RESUME_INVARIANTS = (
    "level",
    "relabel",
    "backbone",
    "image_size",
    "channels",
    "batch_size",
    "seed",
    "val_fraction",
    "folds",
    "fold",
    "extra_data",
)


def data_root(config: TrainConfig) -> Path:
    """The folder a resolved run reads: data_dir, or with extra data sources their view (`hpa_nb.data.combined`)
    in the working folder."""
    if not config.extra_data:
        return Path(config.data_dir)
    return combined.combine([config.data_dir, *config.extra_data], working_dir())


def resolve(config: TrainConfig) -> TrainConfig:
    """`config` checked, with what it leaves open found: the data (`find_data`), the run folder (``out/run``), the
    shards and, for a cell run, the tiles. On Kaggle a full run on the synthetic sample stops here (`preflight`)."""
    validate(config)
    root = Path(config.data_dir) if config.data_dir else _discover()
    run_dir = Path(config.out_dir) if config.out_dir else run.default_dir()
    for folder in (root, *config.extra_data):
        preflight.check_data(Path(folder), config.quick, config.allow_sample_data)
    return dataclasses.replace(
        config,
        data_dir=str(root),
        out_dir=str(run_dir),
        resume=config.resume or bool(config.resume_from),
        shards=_find_shards(config.shards),
        tiles=_find_tiles(root, config) if config.level == "cell" else None,
    )


def _relabelled_targets(run_dir: Path, train_keys: list[str]) -> dict[str, np.ndarray]:
    """The targets.csv that the relabel step (`hpa_nb.cells.relabel.relabel`) wrote into `run_dir`, for every training tile."""
    targets = run.load_targets(run_dir)
    where = run.RunFolder(run_dir).targets
    if targets is None:
        raise FileNotFoundError(
            f"relabel: no {where}: run the relabel step first (python -m hpa_nb train --relabel "
            "runs it, or hpa_nb.cells.relabel.relabel(config) in a notebook)"
        )
    missing = [key for key in train_keys if key not in targets]
    if missing:
        raise ValueError(
            f"relabel: {where} has no target for {len(missing)} training cells (e.g. {missing[0]}): it was "
            "written for another split or other tiles; run the relabel step again"
        )
    return targets


def prepare(config: TrainConfig, hosts: Hosts | None = None) -> Plan:
    """Check everything that can fail cheaply, then build the run: accelerator, split, data, model.

    On Kaggle a full run stops here, before its first training step, when it would train on the
    synthetic sample or on a CPU (`hpa_nb.training.preflight`). ``resume_from`` copies an earlier run
    (a killed Kaggle session's output) into ``out_dir`` and resumes it; so does ``resume`` with
    the run already there. A fresh run clears the folder's previous run first.

    `hosts` (default: `hpa_nb.training.hosts.from_environment`, one unless a TPU slice or Keras's variables say
    otherwise) are joined first; then host 0 alone writes the run folder and the others read it.
    """

    preflight.report_versions(sys.stderr)
    config = resolve(config)
    hosts = hosts or hosting.from_environment()
    hosting.start(hosts, config.seed)  # before JAX touches a device
    root, run_dir = data_root(config), Path(config.out_dir)
    if hosts.writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        if config.resume_from:
            run.adopt(inputs.previous_run(config.resume_from), run_dir)
    accelerator = detect(config.cpu_replicas, config.precision, hosts=hosts)  # before TF touches its devices
    preflight.check_accelerator(accelerator.device_kind, config.quick, config.allow_cpu)
    keras.utils.set_random_seed(config.seed)  # weights initialisation and dropout repeat with the seed
    fingerprint = run.data_fingerprint(root)
    if hosts.writer:
        if config.resume:
            _check_resumable(run_dir, config, fingerprint)
        else:  # a relabelled run keeps the targets its relabel step wrote (hpa_nb.cells.relabel)
            run.clear_previous(run_dir, keep=run.RELABEL_FILES if config.relabel else ())
        train_ids, val_ids, train_matrix, val_matrix = _split(root, run_dir, config, reuse=config.resume)
    hosting.barrier("hpa_nb: the run folder is ready", hosts)  # host 0 has cleared or adopted it, and split
    if not hosts.writer:
        train_ids, val_ids, train_matrix, val_matrix = _split(root, run_dir, config, reuse=True, writer=False)
    finished, checkpoint = run.last_checkpoint(run_dir) if config.resume else (0, None)
    _check_same_on_every_host(hosts, run_dir, finished, fingerprint)
    if config.resume and checkpoint is None:
        print(f"resume: no checkpoint in {run.RunFolder(run_dir).checkpoints}, starting from scratch", file=sys.stderr)
    layout = pipeline.describe_layout(root, config.channels, _records(config))

    global_batch = accelerator.global_batch_size(config.batch_size)
    steps_per_epoch, steps_per_execution = whole_executions(
        config.steps_per_epoch or max(1, len(train_ids) // global_batch),
        config.steps_per_execution or accelerator.steps_per_execution,
        explicit=bool(config.steps_per_epoch),
    )
    runtime = {
        "backend": accelerator.backend,
        "device": accelerator.device_kind,
        "device_name": accelerator.device_name,
        "distribution": accelerator.path,
        "replicas": accelerator.replicas,
        "precision": accelerator.precision,
        "global_batch_size": global_batch,
        "steps_per_epoch_used": steps_per_epoch,
        "steps_per_execution_used": steps_per_execution,
        "train_images": len(train_ids),
        "val_images": len(val_ids),
        "data_fingerprint": fingerprint,
        "hosts": hosts.count,
        "data_source": source_record(Path(config.data_dir)),
    }  # the first source, not a view of several
    if hosts.writer:
        run.write_info(run_dir, config, runtime)
    targets = _relabelled_targets(run_dir, train_ids) if config.relabel else None
    if targets is not None:
        train_matrix = np.stack([targets[key] for key in train_ids])
    datasets = _datasets(
        root,
        train_ids,
        val_ids,
        config,
        global_batch,
        accelerator.replicas,
        start_batch=finished * steps_per_epoch,
        targets=targets,
        hosts=hosts,
    )
    # Classes without both positives and negatives in validation have no AUC; leave them out.
    val_positives = val_matrix.sum(axis=0)
    label_weights = ((val_positives > 0) & (val_positives < len(val_ids))).astype(np.float32)
    schedule = learning_rate_schedule(config, steps_per_epoch, global_batch)
    with accelerator.scope():
        if checkpoint is not None:
            register_classes(config.backbone)
            model = load_checkpoint(checkpoint)  # weights, optimizer state and step count
            print(f"resume: continuing after epoch {finished} from {checkpoint}", file=sys.stderr)
        else:
            model = build(config.backbone, config.image_size, config.channels, config.weights, config.dropout)
            _compile(
                model,
                config,
                schedule,
                class_weights(train_matrix, config.max_positive_weight),
                label_weights,
                steps_per_execution,
            )
        hosting.share_weights(model, hosts)  # every host starts from host 0's weights
    plan = Plan(
        config,
        run_dir,
        accelerator,
        train_ids,
        val_ids,
        train_matrix,
        global_batch,
        steps_per_epoch,
        steps_per_execution,
        schedule,
        model,
        finished,
        datasets,
        runtime,
        layout,
        root,
    )
    return plan


def _check_same_on_every_host(hosts: Hosts, run_dir: Path, finished: int, fingerprint: str) -> None:
    """Stop on a host whose data or run folder is not host 0's: every host must read the same images and the
    same checkpoints, or their replicas would silently part."""
    if not hosts.several:
        return
    # int32: JAX's default integer; the fingerprint's hex digits in groups of four
    mine = np.array([finished, *(int(fingerprint[at : at + 4], 16) for at in range(0, len(fingerprint), 4))], np.int32)
    theirs = hosting.agree(mine, hosts)
    if not np.array_equal(theirs[1:], mine[1:]):
        raise ValueError(
            f"host {hosts.index} reads other data than host 0 (fingerprint {fingerprint}): give every "
            "host the same data folder"
        )
    if theirs[0] != mine[0]:
        raise ValueError(
            f"host {hosts.index} sees {finished} finished epochs in {run_dir}, host 0 sees {theirs[0]}: "
            "the run folder must be one folder that every host sees (a bucket or NFS share)"
        )


def _check_resumable(run_dir: Path, config: TrainConfig, fingerprint: str) -> None:
    """Refuse to resume a run with other data or other model-shaping options than it was trained with."""
    if not run.RunFolder(run_dir).config.is_file():
        return
    saved = run.load_info(run_dir)
    for name in RESUME_INVARIANTS:
        if name in saved and saved[name] != getattr(config, name):
            raise ValueError(
                f"cannot resume {run_dir}: it was trained with {name}={saved[name]!r}, not {getattr(config, name)!r}"
            )
    if saved.get("data_fingerprint") not in (None, fingerprint):
        raise ValueError(
            f"cannot resume {run_dir}: it was trained on other data than {config.data_dir} "
            f"(fingerprint {saved['data_fingerprint']}, now {fingerprint})"
        )


def _compile(
    model,
    config: TrainConfig,
    schedule,
    positive_weights: np.ndarray,
    label_weights: np.ndarray,
    steps_per_execution: int,
) -> None:

    gamma = config.focal_gamma if config.loss == "focal" else 0.0
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=WeightedBinaryCrossentropy(positive_weights, focal_gamma=gamma),
        metrics=make_metrics(label_weights),
        steps_per_execution=steps_per_execution,
    )


def fit(plan: Plan) -> TrainResult:
    """Train the planned model and write the run folder: ``model.fit``, then the final validation and the model.

    Validates on the held-out split after every epoch, writes history.csv and a checkpoint after
    every epoch (a resumed run continues after the last one, the LR schedule and the data stream
    where they stopped), stops early on the validation macro AUC keeping the best weights, and
    stops on a NaN loss. Batch-norm statistics are re-estimated over training batches before each
    validation (``bn_recalibration``), so the saved model predicts well in inference mode.
    """

    config, run_dir, model, finished, writer = (
        plan.config,
        plan.run_dir,
        plan.model,
        plan.finished_epochs,
        plan.hosts.writer,
    )
    recalibration_steps = min(config.bn_recalibration_steps, plan.steps_per_epoch)
    callbacks = _callbacks(plan, recalibration_steps)
    # None, said in one line, when off; only the host that writes the run folder tracks it
    tracker = tracking.start(run_dir, {**config.to_json(), **plan.runtime}) if writer else None
    if tracker is not None:
        callbacks.insert(-1, tracker)  # the clock stays last
    history = model.fit(
        plan.datasets["train"],
        epochs=config.epochs,
        initial_epoch=finished,
        steps_per_epoch=plan.steps_per_epoch,
        validation_data=plan.datasets["val"],
        callbacks=callbacks,
        verbose=config.verbose if writer else 0,
        shuffle=False,
    )  # the dataset shuffles itself
    stopped_at_deadline = callbacks[-1].stopped_at_deadline
    losses = history.history.get("loss", [])
    if any(not np.isfinite(value) for value in losses):
        raise FloatingPointError(f"training loss became NaN/inf in {run_dir}: lower --max-lr or check the data")

    # With "epoch", the weights kept (best or last epoch) already carry statistics re-estimated for them.
    if config.bn_recalibration == "end":
        recalibrate(model, plan.datasets["recalibration"], recalibration_steps)
    final = {}
    if model.compiled:
        final = {
            f"val_{k}": float(v) for k, v in model.evaluate(plan.datasets["val"], verbose=0, return_dict=True).items()
        }
    if writer:
        with hosting.alone(plan.hosts):
            save_for_inference(model, run.RunFolder(run_dir).model)
    write_held_out_predictions(plan)  # every host computes its part; the writer writes them
    runtime = {
        **plan.runtime,
        "epochs_run": int(finished + len(losses)),
        "final": final,
        "stopped_at_deadline": stopped_at_deadline,
    }
    if not writer:  # host 0 has written every epoch's row by now: it joined the collective steps since
        print(f"train: host {plan.hosts.index} done; host 0 wrote {run_dir}", file=sys.stderr)
        return TrainResult(run_dir, model, run.load_history(run_dir), final, stopped_at_deadline)
    run.write_info(run_dir, config, runtime)
    frame = run.load_history(run_dir)
    if tracker is not None:
        tracker.finish(final, epochs_run=runtime["epochs_run"], stopped_at_deadline=stopped_at_deadline)
    print(
        f"train: wrote {run.RunFolder(run_dir).model}; validation of the saved model: "
        + ", ".join(f"{k} {v:.4f}" for k, v in final.items()),
        file=sys.stderr,
    )
    return TrainResult(run_dir, model, frame, final, stopped_at_deadline)


def write_held_out_predictions(plan: Plan) -> Path:
    """``RUN/oof.csv``: the saved model's predictions for every held-out image (or tile), in the
    predictions.csv format. For a fold run these are its out-of-fold predictions (`hpa_nb.training.folds`).
    Over several hosts each computes its rows of every batch (`hpa_nb.training.hosts.predictor`), and host 0 writes."""
    config, hosts = plan.config, plan.hosts
    dataset = pipeline.eval_dataset(
        plan.root,
        plan.val_ids,
        config.image_size,
        config.channels,
        plan.global_batch,
        with_id=True,
        shards=_records(config),
    )
    ids, _, scores = predictions.predict(
        plan.model,
        dataset,
        total=len(plan.val_ids),
        desc="held-out predictions",
        multiple=plan.accelerator.replicas,
        forward=hosting.predictor(plan.model, hosts) if hosts.several else None,
    )
    (scores,) = predictions.reorder(plan.val_ids, ids, scores)  # in split.csv's order
    path = run.RunFolder(plan.run_dir).oof
    return predictions.write_predictions(path, plan.val_ids, scores) if hosts.writer else path


def save_for_inference(model, path: Path) -> Path:
    """Save `model`'s layers and weights without its optimizer, loss and metrics, atomically.

    The file then names no class of this package, so ``keras.saving.load_model(path)`` loads it in any
    process, with or without ``import hpa_nb`` (the checkpoints keep the optimizer, for resuming).
    """
    inference = keras.Model(model.input, model.output, name=model.name)  # one input stays one, not a list
    with atomic_path(path) as temporary:
        inference.save(temporary)
    return path


def train(config: TrainConfig, hosts: Hosts | None = None) -> TrainResult:
    """`prepare` then `fit`: the whole run, as the CLI does it, with the plan's summary on stderr."""
    plan = prepare(config, hosts)
    print(plan.summary(), file=sys.stderr)
    return fit(plan)


def _datasets(
    root: Path,
    train_ids: list[str],
    val_ids: list[str],
    config: TrainConfig,
    global_batch: int,
    replicas: int,
    start_batch: int,
    targets: dict | None = None,
    hosts: Hosts = Hosts(),
) -> dict:
    """Training (infinite, augmented, from `start_batch` on), validation (finite, padded) and BN re-estimation data:
    this host's rows of every global batch."""

    common = {
        "image_size": config.image_size,
        "channels": config.channels,
        "batch_size": global_batch,
        "shards": _records(config),
    }
    workers = {"num_workers": hosts.count, "worker_index": hosts.index}
    trace = hosting.trace_path(hosts)
    stream = pipeline.Stream(
        seed=config.seed,
        augment=config.augment,
        cache=config.cache,
        start_batch=start_batch,
        trace=None if trace is None else str(trace),
        **workers,
    )
    train_data = pipeline.training_dataset(root, train_ids, stream=stream, targets=targets, **common)
    val_bytes = len(val_ids) * config.image_size**2 * len(config.channels)  # uint8 images
    val_data = pipeline.eval_dataset(
        root, val_ids, with_id=False, cache=val_bytes <= config.val_cache_gib * 2**30, **common
    )
    # A known length keeps Keras from warning "ran out of data" after every validation pass.
    val_data = val_data.apply(tf.data.experimental.assert_cardinality(math.ceil(len(val_ids) / global_batch)))
    if replicas > 1:
        val_data = hosting.local_rows(pad_batches(val_data, replicas), hosts)
    # BN statistics are for inference inputs: training images without augmentation.
    unaugmented = pipeline.Stream(seed=config.seed + 1, augment=False, **workers)
    recalibration_data = pipeline.training_dataset(root, train_ids, stream=unaugmented, **common)
    return {"train": train_data, "val": val_data, "recalibration": recalibration_data}


def _callbacks(plan: Plan, recalibration_steps: int) -> list:
    run_dir, config, finished, writer = plan.run_dir, plan.config, plan.finished_epochs, plan.hosts.writer
    if writer:  # the finished epochs' rows; not those of an epoch without its checkpoint
        run.truncate_history(run_dir, finished)
    recalibration = (
        [callbacks.recalibration(plan.datasets["recalibration"], recalibration_steps)]
        if config.bn_recalibration == "epoch"
        else []
    )
    return [
        *recalibration,  # runs before each validation, so checkpoints and early stopping see its statistics
        *([callbacks.epoch_recorder(run_dir, config.keep_checkpoints, plan.hosts)] if writer else []),
        keras.callbacks.EarlyStopping(monitor=MONITOR, mode="max", patience=config.patience, restore_best_weights=True),
        keras.callbacks.TerminateOnNaN(),
        callbacks.clock(plan),  # last: after the epoch's checkpoint is written
    ]


def _find_shards(reference: str | None) -> str | None:
    """The shard folder a run reads: the one `reference` names, else on Kaggle any attached (else None)."""
    if reference is None and not on_kaggle():
        return None
    found = inputs.find("shards", reference, consumer="03_train", required=False)
    return None if found is None else str(found)


def _find_tiles(root: Path, config: TrainConfig) -> str:
    """The tile folder a cell run reads: the one `config.tiles` names (a folder, or OWNER/KERNEL attached on
    Kaggle), else ``root/tiles``, else the tiles of 06_cells (on Kaggle: attached; elsewhere: out/tiles)."""
    if config.tiles is None and tiles.is_tile_folder(tiles.default_dir(root)):
        return str(tiles.default_dir(root))
    if config.tiles is not None and tiles.is_tile_folder(config.tiles):
        return str(config.tiles)
    if config.tiles is not None and Path(config.tiles).is_dir():
        tiles.read_manifest(config.tiles)  # a folder without tiles.json stops here, named
    found = inputs.find("tiles", config.tiles, consumer="07_cell_train", required=False)
    if found is None:
        raise FileNotFoundError(
            f"a cell run needs cell tiles: none in {tiles.default_dir(root)}; write them first "
            f"(python -m hpa_nb tiles --src {root}) or name them with --tiles"
        )
    return str(found)


def _records(config: TrainConfig) -> str | None:
    """What the data layer reads besides data_dir: the cell tiles of a cell run, else the shards (if any)."""
    return config.tiles if config.level == "cell" else config.shards


def _discover() -> Path:
    source = find_data()
    print(f"data: {source}", file=sys.stderr)
    return source.path


def image_run(
    reference: str | Path | None = None,
    consumer: str | None = None,
    quick: bool = True,
    environ: Mapping[str, str] = os.environ,
) -> Path:
    """The image run a kernel after ``03_train`` uses (`find`). Off Kaggle, with none named and none in
    ``out/run``, a quick one is trained there first, so each notebook also runs on its own; on Kaggle, never."""
    found = inputs.find("image_run", reference, consumer=consumer, environ=environ)
    if found is None:
        found = run.default_dir()
        print(f"no trained model in {found}: training a {'quick' if quick else 'full'} one first", file=sys.stderr)
        train(TrainConfig.make(quick, out_dir=str(found)))
    note = run.unfinished(found)  # usable, but stopped at its deadline before all its epochs
    if note:
        print(f"note: {note}", file=sys.stderr)
    return found
