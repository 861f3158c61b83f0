"""Training: one dataclass config shared by the CLI and the notebooks; `prepare(config)` builds a `Plan`
(checks, accelerator, split, data, compiled model) and `fit(plan)` trains it into a run folder.

A run folder holds ``model.keras`` (loads with `hpa_nb.model.load_model`), ``history.csv``,
``config.json`` (every option plus the backend, device, replicas, global batch and a data
fingerprint), ``split.csv`` (ID, subset) and ``checkpoints/`` (one per epoch, for ``resume``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpa_nb.files import atomic_path, write_text

CONFIG_FILE = "config.json"
MODEL_FILE = "model.keras"
HISTORY_FILE = "history.csv"
SPLIT_FILE = "split.csv"
CHECKPOINT_DIR = "checkpoints"
LOSSES = ("bce", "focal")  # both with per-class positive weights; focal uses focal_gamma
MONITOR = "val_auc"  # early stopping and "best epoch" follow the validation macro ROC AUC


@dataclass
class TrainConfig:
    """Every training option. Saved as ``RUN/config.json``; `quick_variant` gives the CI / smoke-run sizes."""

    data_dir: str | None = None  # None: the folder `hpa_nb.env.find_data` discovers
    # Compact shards elsewhere (a folder, or OWNER/KERNEL of the prepare kernel attached as input), paired with
    # data_dir's train.csv. None: data_dir/shards when it exists, else on Kaggle any attached shards.
    shards: str | None = None
    out_dir: str = "out/run"
    image_size: int = 384
    channels: str = "rgb"  # "rgb" or "rgby"
    backbone: str = "efficientnetb0"  # a key of hpa_nb.model.BACKBONES
    weights: str | None = "imagenet"  # "imagenet", None ("none" too), or a weights file (see hpa_nb.model.build)
    dropout: float = 0.3
    epochs: int = 20
    batch_size: int = 16  # per replica; the global batch is this × replicas
    steps_per_epoch: int | None = None  # None: one pass over the training split
    val_fraction: float = 0.2
    seed: int = 0
    quick: bool = False
    resume: bool = False
    # optimisation: Adam with linear warmup → sustain → exponential decay (hpa_nb.schedule)
    max_lr: float = 1e-3  # peak for a global batch of 64, scaled linearly with the actual global batch
    initial_lr: float = 1e-5
    warmup_epochs: float = 1.0
    sustain_epochs: float = 0.0
    lr_decay: float = 0.8  # per epoch after the sustain phase
    min_lr: float = 1e-6
    loss: str = "bce"  # "bce" or "focal", both with per-class positive weights
    focal_gamma: float = 2.0
    max_positive_weight: float = 20.0
    patience: int = 5  # early stopping on val_auc, best weights restored
    augment: bool = True
    cache: bool = False  # cache decoded images in memory (small data sets only)
    val_cache_gib: float = 4.0  # keep the decoded validation images in memory when they take at most this
    # runtime
    precision: str | None = None  # None: by device (mixed_bfloat16 on TPU, mixed_float16 on GPU, float32 on CPU)
    steps_per_execution: int | None = None  # None: 32 on TPU, 8 on GPU, 1 on CPU
    # Re-estimate batch-norm statistics over training batches (see hpa_nb.batch_norm):
    # "epoch" before every validation (so val metrics, checkpoints and early stopping see the
    # statistics the saved model will have), "end" once after training, or "off".
    bn_recalibration: str = "epoch"
    bn_recalibration_steps: int = 20
    cpu_replicas: int | None = None  # TF only: MirroredStrategy over this many logical CPUs (tests)
    verbose: int | str = "auto"  # Keras fit verbosity: progress bar by default
    keep_checkpoints: int = 2
    resume_from: str | None = None  # a run folder, or OWNER/KERNEL attached as input: copied to out_dir, resumed
    # On Kaggle a full run stops before training on the synthetic sample or on a CPU (hpa_nb.preflight).
    allow_sample_data: bool = False
    allow_cpu: bool = False

    def __post_init__(self) -> None:
        # "none" (the CLI's spelling) becomes None here, so config.json and every reader see one form.
        if isinstance(self.weights, str) and self.weights.lower() in ("none", ""):
            self.weights = None

    @classmethod
    def quick_variant(cls, **overrides: Any) -> "TrainConfig":
        """The quick configuration (tiny CNN from scratch, 64 px, 5 epochs), with `overrides` applied on top."""
        return cls(**{**QUICK, **overrides})

    @classmethod
    def make(cls, quick: bool, **options: Any) -> "TrainConfig":
        """The quick or the full configuration with `options` on top; an option given as None keeps its default."""
        given = {name: value for name, value in options.items() if value is not None}
        return cls.quick_variant(**given) if quick else cls(**given)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# Sized so the default sample trains in about a minute on two CPU cores and still learns:
# validation macro AUC 0.72–0.77 over seeds 0–2 (0.68 with 3 epochs).
QUICK: dict[str, Any] = {
    "quick": True, "backbone": "tiny", "weights": None, "image_size": 64, "epochs": 5, "batch_size": 16,
    "max_lr": 8e-3, "initial_lr": 1e-4, "warmup_epochs": 0.5, "lr_decay": 0.7, "dropout": 0.2,
    "patience": 3, "cache": True,
}
BN_RECALIBRATION = ("epoch", "end", "off")
CONFIG_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


@dataclass
class TrainResult:
    """What `train` returns: the run folder, the trained model and its per-epoch history."""

    run_dir: Path
    model: Any = field(repr=False)
    history: Any = field(repr=False)  # pandas DataFrame of history.csv
    final: dict = field(default_factory=dict)  # validation metrics of the saved model (after BN re-estimation)


def load_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig a run was trained with (extra runtime keys in config.json are ignored)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in run folder {run_dir}")
    saved = json.loads(path.read_text())
    return TrainConfig(**{key: value for key, value in saved.items() if key in CONFIG_FIELDS})


def load_split(run_dir: str | Path) -> dict[str, list[str]]:
    """The run's ``split.csv`` as ``{"train": [IDs], "val": [IDs]}``."""
    import pandas as pd

    path = Path(run_dir) / SPLIT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {SPLIT_FILE} in run folder {run_dir}")
    saved = pd.read_csv(path, dtype=str, keep_default_na=False)  # IDs as written: "0001" stays "0001"
    if not {"ID", "subset"} <= set(saved.columns):
        raise ValueError(f"{path} must have columns ID,subset")
    return {subset: saved.loc[saved["subset"] == subset, "ID"].tolist() for subset in ("train", "val")}


def write_split(run_dir: str | Path, train_ids: list[str], val_ids: list[str]) -> Path:
    """Write the run's ``split.csv`` (ID, subset), which `load_split` reads back."""
    import pandas as pd

    frame = pd.DataFrame({"ID": [*train_ids, *val_ids], "subset": ["train"] * len(train_ids) + ["val"] * len(val_ids)})
    return write_text(Path(run_dir) / SPLIT_FILE, frame.to_csv(index=False))


def ensure_run(run_dir: str | Path, quick: bool = True, data_dir: str | Path | None = None) -> TrainConfig:
    """The config of the run in `run_dir`, training one first (quick sizes by default) if it has no model yet.

    This lets every notebook after ``03_train`` also run on its own.
    """
    run_dir = Path(run_dir)
    if not (run_dir / MODEL_FILE).is_file():
        print(f"no trained model in {run_dir}: training a {'quick' if quick else 'full'} one first", file=sys.stderr)
        train(TrainConfig.make(quick, out_dir=str(run_dir), data_dir=None if data_dir is None else str(data_dir)))
    return load_config(run_dir)


def load_run_info(run_dir: str | Path) -> dict:
    """The whole config.json of a run: options plus backend, device, replicas, data fingerprint, results."""
    return json.loads((Path(run_dir) / CONFIG_FILE).read_text())


def data_fingerprint(root: Path) -> str:
    """A short hash of train.csv and the record files' names and sizes: which data a run saw."""
    digest = hashlib.sha256((root / "train.csv").read_bytes())
    for folder in ("shards", "train_tfrecords"):
        for path in sorted((root / folder).glob("*")) if (root / folder).is_dir() else []:
            digest.update(f"{folder}/{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def _validate(config: TrainConfig) -> None:
    from hpa_nb.model import BACKBONES, CHANNELS, normalize_weights

    normalize_weights(config.weights)  # a missing weights file fails now, not after the data is read
    if config.backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {config.backbone!r}; choose from {', '.join(BACKBONES)}")
    if config.channels not in CHANNELS:
        raise ValueError(f"channels must be one of {', '.join(CHANNELS)}, got {config.channels!r}")
    if config.bn_recalibration not in BN_RECALIBRATION:
        raise ValueError(f"bn_recalibration must be one of {', '.join(BN_RECALIBRATION)}, "
                         f"got {config.bn_recalibration!r}")
    if config.loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {config.loss!r}")
    if not 0 < config.val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {config.val_fraction}")
    for name in ("image_size", "epochs", "batch_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.image_size < 32:
        raise ValueError(f"image_size must be at least 32 px, got {config.image_size}")


# --- split --------------------------------------------------------------------------------
def _split(root: Path, run_dir: Path, config: TrainConfig,
           reuse: bool) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Train / validation IDs (the saved split when resuming) and their label matrices."""
    from hpa_nb import data, shards
    from hpa_nb.competition import load_labels
    from hpa_nb.labels import label_matrix
    from hpa_nb.splits import split

    frame = load_labels(root)
    found = data.shard_folder(root, config.channels, config.shards)
    if found is not None:  # shards written elsewhere: only the images they hold, and only if they match train.csv
        frame = shards.pair(*found, frame, root)
    ids = frame["ID"].tolist()
    matrix = label_matrix(ids, frame["Label"])
    if reuse and (run_dir / SPLIT_FILE).is_file():
        saved = load_split(run_dir)
        train_ids, val_ids = saved["train"], saved["val"]
    else:
        train_ids, val_ids = split(ids, matrix, config.val_fraction, config.seed)
        write_split(run_dir, train_ids, val_ids)
    if not train_ids or not val_ids:
        raise ValueError(f"split of {len(ids)} images in {root} left an empty train or validation subset")
    return list(train_ids), list(val_ids), _rows(train_ids, ids, matrix), _rows(val_ids, ids, matrix)


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
    import tensorflow as tf

    def pad(images, labels):
        count = tf.shape(images)[0]
        missing = (multiple - count % multiple) % multiple
        weights = tf.concat([tf.ones([count]), tf.zeros([missing])], axis=0)
        images = tf.pad(images, [[0, missing], [0, 0], [0, 0], [0, 0]])
        labels = tf.pad(labels, [[0, missing], [0, 0]])
        return images, labels, weights

    return dataset.map(pad)


# --- the run folder's checkpoints, history and resume ---------------------------------------
def checkpoint_path(run_dir: Path, epoch: int) -> Path:
    """The checkpoint written after `epoch` epochs (1-based)."""
    return run_dir / CHECKPOINT_DIR / f"epoch-{epoch:03d}.keras"


def last_checkpoint(run_dir: Path) -> tuple[int, Path | None]:
    """(epochs finished, their checkpoint), or (0, None) when the run has none."""
    found = sorted((run_dir / CHECKPOINT_DIR).glob("epoch-*.keras"))
    if not found:
        return 0, None
    return int(found[-1].stem.split("-")[1]), found[-1]


def load_checkpoint(path: Path):
    """A checkpoint with its optimizer, in any process: the classes it names are registered first."""
    import keras

    from hpa_nb import model, schedule  # noqa: F401  (register WarmupSustainDecay, the loss and the metrics)

    return keras.saving.load_model(path)


def clear_previous_run(run_dir: Path) -> list[str]:
    """Remove an earlier run's files from `run_dir` before a fresh (not resumed) run writes there.

    Otherwise a new run that fails early would leave its config and split beside the old run's
    model, and the folder would describe a model it does not hold. Returns the names removed.
    """
    import shutil

    removed = []
    for name in (MODEL_FILE, HISTORY_FILE, CONFIG_FILE, SPLIT_FILE, CHECKPOINT_DIR):
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        print(f"train: new run in {run_dir}: removed the previous run's {', '.join(removed)} "
              "(use --resume to continue it instead)", file=sys.stderr)
    return removed


def find_previous_run(reference: str | Path, input_root: Path | None = None) -> Path:
    """The run folder `reference` names: a folder, or ``OWNER/KERNEL`` (or ``KERNEL``) attached under /kaggle/input.

    A run folder holds config.json and checkpoints/. Kaggle mounts a kernel's output under its
    slug, at a depth that has changed over time, so the slug's folder is searched for.
    """
    from hpa_nb.env import KAGGLE_INPUT, search_folders

    path = Path(reference).expanduser()
    if path.is_dir():
        found = _run_folders(path)
        if not found:
            raise FileNotFoundError(f"RESUME_FROM {path} holds no run folder ({CONFIG_FILE} and {CHECKPOINT_DIR}/)")
        return found[0]
    root = input_root or KAGGLE_INPUT
    slug = str(reference).rstrip("/").rpartition("/")[2]
    mounts = search_folders(root, lambda folder, _: folder.name == slug, 4)
    found = [run for mount in mounts for run in _run_folders(mount)]
    if not found:
        raise FileNotFoundError(f"RESUME_FROM {reference}: no attached output named {slug!r} with a run folder "
                                f"under {root}; attach the earlier version as input "
                                f"(python -m hpa_nb kaggle push 03_train --resume-from OWNER/KERNEL)")
    return found[0]


def _run_folders(folder: Path, max_depth: int = 3) -> list[Path]:
    """Run folders at or below `folder`, shallowest first."""
    found = []
    for current, subfolders, files in os.walk(folder):
        depth = len(Path(current).relative_to(folder).parts)
        if CONFIG_FILE in files and CHECKPOINT_DIR in subfolders:
            found.append(Path(current))
        if depth >= max_depth:
            subfolders.clear()
        subfolders.sort()
    return sorted(found, key=lambda path: len(path.parts))


def adopt_run(source: Path, run_dir: Path) -> int:
    """Copy a killed run's config, split, history and last checkpoint into `run_dir`, to resume there.

    Nothing is copied when `run_dir` already has as many finished epochs (a re-run of the same
    session). Returns the epochs the copied run had finished.
    """
    import shutil

    finished, checkpoint = last_checkpoint(source)
    if checkpoint is None:
        raise FileNotFoundError(f"{source} has no checkpoint to resume from")
    if last_checkpoint(run_dir)[0] >= finished:
        return finished
    (run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, SPLIT_FILE, HISTORY_FILE):
        if (source / name).is_file():
            with atomic_path(run_dir / name) as temporary:
                shutil.copyfile(source / name, temporary)
    with atomic_path(checkpoint_path(run_dir, finished)) as temporary:
        shutil.copyfile(checkpoint, temporary)
    print(f"resume: copied {source} (after epoch {finished}) into {run_dir}", file=sys.stderr)
    return finished


def _epoch_recorder(run_dir: Path, keep: int):
    import keras
    import pandas as pd

    class EpochRecorder(keras.callbacks.Callback):
        """After every epoch: its row of history.csv, then the full checkpoint (optimizer included).

        Both are written atomically, the history first. A run killed between the two leaves a row
        without a checkpoint, which the resumed run drops and writes again; never a checkpoint
        whose epoch is missing from the history.
        """

        def on_epoch_end(self, epoch, logs=None):
            path = run_dir / HISTORY_FILE
            earlier = pd.read_csv(path) if path.is_file() else pd.DataFrame()
            row = pd.DataFrame([{"epoch": epoch, **{key: float(value) for key, value in sorted((logs or {}).items())}}])
            write_text(path, pd.concat([earlier, row], ignore_index=True).to_csv(index=False))
            (run_dir / CHECKPOINT_DIR).mkdir(exist_ok=True)
            with atomic_path(checkpoint_path(run_dir, epoch + 1)) as temporary:  # ends in .keras, as Keras requires
                self.model.save(temporary)
            for old in sorted((run_dir / CHECKPOINT_DIR).glob("epoch-*.keras"))[:-keep]:
                old.unlink()

    return EpochRecorder()


def _recalibration_callback(dataset, steps: int):
    import keras

    from hpa_nb.batch_norm import recalibrate

    class BatchNormRecalibration(keras.callbacks.Callback):
        """Re-estimate batch-norm statistics just before each validation pass inside ``fit``.

        Keras calls ``on_test_begin`` after the epoch's training steps (and, on JAX, after the
        weights are synced back to the model), so the validation and the checkpoint written at the
        end of the epoch both see the re-estimated statistics; training runs in training mode and
        is unaffected by them.
        """

        def on_test_begin(self, logs=None):
            recalibrate(self.model, dataset, steps)

    return BatchNormRecalibration()


# --- prepare, then fit --------------------------------------------------------------------
def learning_rate_schedule(config: TrainConfig, steps_per_epoch: int, global_batch: int):
    """The warmup → sustain → decay schedule training uses, for a run of `config` (plotted in 03_train)."""
    from hpa_nb import schedule

    return schedule.from_epochs(
        steps_per_epoch, global_batch, max_lr=config.max_lr, initial_lr=config.initial_lr,
        warmup_epochs=config.warmup_epochs, sustain_epochs=config.sustain_epochs, decay=config.lr_decay,
        min_lr=config.min_lr)


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

    def summary(self) -> str:
        """What the run will do, in a few lines."""
        start = f"resuming after epoch {self.finished_epochs}" if self.finished_epochs else "a fresh run"
        return "\n".join([
            f"accelerator: {self.accelerator.describe()}",
            f"data: {self.layout}",
            f"split: {len(self.train_ids)} training and {len(self.val_ids)} validation images",
            f"steps: global batch {self.global_batch}, {self.steps_per_epoch} steps per epoch, "
            f"{self.steps_per_execution} per compiled call",
            f"run: {self.run_dir} ({start}, {self.config.epochs} epochs)"])


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
        print(f"train: {rounded} steps per epoch, not {steps_per_epoch}: a whole number of compiled calls of "
              f"{steps_per_execution} steps", file=sys.stderr)
    return rounded, steps_per_execution


# Options a resumed run must share with the run it continues: they shape the model, its inputs or its split.
RESUME_INVARIANTS = ("backbone", "image_size", "channels", "batch_size", "seed", "val_fraction")


def prepare(config: TrainConfig) -> Plan:
    """Check everything that can fail cheaply, then build the run: accelerator, split, data, model.

    On Kaggle a full run stops here, before its first training step, when it would train on the
    synthetic sample or on a CPU (`hpa_nb.preflight`). ``resume_from`` copies an earlier run
    (a killed Kaggle session's output) into ``out_dir`` and resumes it; so does ``resume`` with
    the run already there. A fresh run clears the folder's previous run first.
    """
    import keras

    from hpa_nb import data, preflight
    from hpa_nb.accelerator import detect
    from hpa_nb.labels import class_weights
    from hpa_nb.model import build

    _validate(config)
    preflight.report_versions(sys.stderr)
    root = Path(config.data_dir) if config.data_dir else _discover()
    run_dir = Path(config.out_dir)
    preflight.check_data(root, config.quick, config.allow_sample_data)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.resume_from:
        adopt_run(find_previous_run(config.resume_from), run_dir)
    config = dataclasses.replace(config, data_dir=str(root), resume=config.resume or bool(config.resume_from),
                                 shards=_find_shards(config.shards))
    accelerator = detect(config.cpu_replicas, config.precision)  # before TF touches its devices
    preflight.check_accelerator(accelerator.device_kind, config.quick, config.allow_cpu)
    keras.utils.set_random_seed(config.seed)  # weights initialisation and dropout repeat with the seed
    fingerprint = data_fingerprint(root)
    if config.resume:
        _check_resumable(run_dir, config, fingerprint)
    else:
        clear_previous_run(run_dir)
    finished, checkpoint = last_checkpoint(run_dir) if config.resume else (0, None)
    if config.resume and checkpoint is None:
        print(f"resume: no checkpoint in {run_dir / CHECKPOINT_DIR}, starting from scratch", file=sys.stderr)
    train_ids, val_ids, train_matrix, val_matrix = _split(root, run_dir, config, reuse=config.resume)
    layout = data.describe_layout(root, config.channels, config.shards)

    global_batch = accelerator.global_batch_size(config.batch_size)
    steps_per_epoch, steps_per_execution = whole_executions(
        config.steps_per_epoch or max(1, len(train_ids) // global_batch),
        config.steps_per_execution or accelerator.steps_per_execution, explicit=bool(config.steps_per_epoch))
    runtime = {"backend": accelerator.backend, "device": accelerator.device_kind,
               "device_name": accelerator.device_name, "distribution": accelerator.path,
               "replicas": accelerator.replicas, "precision": accelerator.precision,
               "global_batch_size": global_batch, "steps_per_epoch_used": steps_per_epoch,
               "steps_per_execution_used": steps_per_execution, "train_images": len(train_ids),
               "val_images": len(val_ids), "data_fingerprint": fingerprint}
    _write_config(run_dir, config, runtime)
    datasets = _datasets(root, train_ids, val_ids, config, global_batch, accelerator.replicas,
                         start_batch=finished * steps_per_epoch)
    # Classes without both positives and negatives in validation have no AUC; leave them out.
    val_positives = val_matrix.sum(axis=0)
    label_weights = ((val_positives > 0) & (val_positives < len(val_ids))).astype(np.float32)
    schedule = learning_rate_schedule(config, steps_per_epoch, global_batch)
    with accelerator.scope():
        if checkpoint is not None:
            model = load_checkpoint(checkpoint)  # weights, optimizer state and step count
            print(f"resume: continuing after epoch {finished} from {checkpoint}", file=sys.stderr)
        else:
            model = build(config.backbone, config.image_size, config.channels, config.weights, config.dropout)
            _compile(model, config, schedule, class_weights(train_matrix, config.max_positive_weight), label_weights,
                     steps_per_execution)
    plan = Plan(config, run_dir, accelerator, train_ids, val_ids, train_matrix, global_batch, steps_per_epoch,
                steps_per_execution, schedule, model, finished, datasets, runtime, layout)
    return plan


def _check_resumable(run_dir: Path, config: TrainConfig, fingerprint: str) -> None:
    """Refuse to resume a run with other data or other model-shaping options than it was trained with."""
    if not (run_dir / CONFIG_FILE).is_file():
        return
    saved = load_run_info(run_dir)
    for name in RESUME_INVARIANTS:
        if name in saved and saved[name] != getattr(config, name):
            raise ValueError(f"cannot resume {run_dir}: it was trained with {name}={saved[name]!r}, "
                             f"not {getattr(config, name)!r}")
    if saved.get("data_fingerprint") not in (None, fingerprint):
        raise ValueError(f"cannot resume {run_dir}: it was trained on other data than {config.data_dir} "
                         f"(fingerprint {saved['data_fingerprint']}, now {fingerprint})")


def _compile(model, config: TrainConfig, schedule, positive_weights: np.ndarray, label_weights: np.ndarray,
             steps_per_execution: int) -> None:
    import keras

    from hpa_nb.model import WeightedBinaryCrossentropy, make_metrics

    gamma = config.focal_gamma if config.loss == "focal" else 0.0
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss=WeightedBinaryCrossentropy(positive_weights, focal_gamma=gamma),
                  metrics=make_metrics(label_weights), steps_per_execution=steps_per_execution)


def fit(plan: Plan) -> TrainResult:
    """Train the planned model and write the run folder: ``model.fit``, then the final validation and the model.

    Validates on the held-out split after every epoch, writes history.csv and a checkpoint after
    every epoch (a resumed run continues after the last one, the LR schedule and the data stream
    where they stopped), stops early on the validation macro AUC keeping the best weights, and
    stops on a NaN loss. Batch-norm statistics are re-estimated over training batches before each
    validation (``bn_recalibration``), so the saved model predicts well in inference mode.
    """
    import pandas as pd

    from hpa_nb.batch_norm import recalibrate

    config, run_dir, model, finished = plan.config, plan.run_dir, plan.model, plan.finished_epochs
    recalibration_steps = min(config.bn_recalibration_steps, plan.steps_per_epoch)
    history = model.fit(plan.datasets["train"], epochs=config.epochs, initial_epoch=finished,
                        steps_per_epoch=plan.steps_per_epoch, validation_data=plan.datasets["val"],
                        callbacks=_callbacks(plan, recalibration_steps), verbose=config.verbose,
                        shuffle=False)  # the dataset shuffles itself
    losses = history.history.get("loss", [])
    if any(not np.isfinite(value) for value in losses):
        raise FloatingPointError(f"training loss became NaN/inf in {run_dir}: lower --max-lr or check the data")

    # With "epoch", the weights kept (best or last epoch) already carry statistics re-estimated for them.
    if config.bn_recalibration == "end":
        recalibrate(model, plan.datasets["recalibration"], recalibration_steps)
    final = {}
    if model.compiled:
        final = {f"val_{k}": float(v) for k, v in
                 model.evaluate(plan.datasets["val"], verbose=0, return_dict=True).items()}
    with atomic_path(run_dir / MODEL_FILE) as temporary:
        model.save(temporary)
    runtime = {**plan.runtime, "epochs_run": int(finished + len(losses)), "final": final}
    _write_config(run_dir, config, runtime)
    frame = pd.read_csv(run_dir / HISTORY_FILE) if (run_dir / HISTORY_FILE).is_file() else pd.DataFrame()
    print(f"train: wrote {run_dir / MODEL_FILE}; validation of the saved model: "
          + ", ".join(f"{k} {v:.4f}" for k, v in final.items()), file=sys.stderr)
    return TrainResult(run_dir, model, frame, final)


def train(config: TrainConfig) -> TrainResult:
    """`prepare` then `fit`: the whole run, as the CLI does it, with the plan's summary on stderr."""
    plan = prepare(config)
    print(plan.summary(), file=sys.stderr)
    return fit(plan)


def _datasets(root: Path, train_ids: list[str], val_ids: list[str], config: TrainConfig, global_batch: int,
              replicas: int, start_batch: int) -> dict:
    """Training (infinite, augmented, from `start_batch` on), validation (finite, padded) and BN re-estimation data."""
    import tensorflow as tf

    from hpa_nb import data

    common = {"image_size": config.image_size, "channels": config.channels, "batch_size": global_batch,
              "shards": config.shards}
    train_data = data.training_dataset(root, train_ids, seed=config.seed, augment=config.augment,
                                       cache=config.cache, start_batch=start_batch, **common)
    val_bytes = len(val_ids) * config.image_size ** 2 * len(config.channels)  # uint8 images
    val_data = data.eval_dataset(root, val_ids, with_id=False, cache=val_bytes <= config.val_cache_gib * 2**30,
                                 **common)
    # A known length keeps Keras from warning "ran out of data" after every validation pass.
    val_data = val_data.apply(tf.data.experimental.assert_cardinality(math.ceil(len(val_ids) / global_batch)))
    if replicas > 1:
        val_data = pad_batches(val_data, replicas)
    # BN statistics are for inference inputs: training images without augmentation.
    recalibration_data = data.training_dataset(root, train_ids, seed=config.seed + 1, augment=False, cache=False,
                                               **common)
    return {"train": train_data, "val": val_data, "recalibration": recalibration_data}


def _callbacks(plan: Plan, recalibration_steps: int) -> list:
    import keras
    import pandas as pd

    run_dir, config, finished = plan.run_dir, plan.config, plan.finished_epochs
    history = run_dir / HISTORY_FILE
    if history.is_file():  # keep the finished epochs' rows; drop those of an epoch that never got its checkpoint
        rows = pd.read_csv(history)
        write_text(history, rows[rows["epoch"] < finished].to_csv(index=False))
    recalibration = ([_recalibration_callback(plan.datasets["recalibration"], recalibration_steps)]
                     if config.bn_recalibration == "epoch" else [])
    return [
        *recalibration,  # runs before each validation, so checkpoints and early stopping see its statistics
        _epoch_recorder(run_dir, config.keep_checkpoints),
        keras.callbacks.EarlyStopping(monitor=MONITOR, mode="max", patience=config.patience,
                                      restore_best_weights=True),
        keras.callbacks.TerminateOnNaN(),
    ]


def _find_shards(reference: str | None) -> str | None:
    """The shard folder a run reads: the one `reference` names, else on Kaggle any attached (else None)."""
    from hpa_nb.env import find_shards, on_kaggle

    if reference is None and not on_kaggle():
        return None
    found = find_shards(reference)
    return None if found is None else str(found)


def _discover() -> Path:
    from hpa_nb.env import find_data

    source = find_data()
    print(f"data: {source}", file=sys.stderr)
    return source.path


def _write_config(run_dir: Path, config: TrainConfig, runtime: dict) -> None:
    write_text(run_dir / CONFIG_FILE, json.dumps({**config.to_json(), **runtime}, indent=1) + "\n")
