"""Training: one dataclass config shared by the CLI and the notebooks, and `train(config)` that writes a run folder.

A run folder holds ``model.keras`` (loads with `hpa_nb.model.load_model`), ``history.csv``,
``config.json`` (every option plus the backend, device, replicas, global batch and a data
fingerprint), ``split.csv`` (ID, subset) and ``checkpoints/`` (one per epoch, for ``resume``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
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
    mixed_precision: bool = True  # bfloat16 on TPU, float16 on GPU; CPU always float32
    steps_per_execution: int | None = None  # None: 32 on TPU, 8 on GPU, 1 on CPU
    # Re-estimate batch-norm statistics over training batches (see recalibrate_batch_norm):
    # "epoch" before every validation (so val metrics, checkpoints and early stopping see the
    # statistics the saved model will have), "end" once after training, or "off".
    bn_recalibration: str = "epoch"
    bn_recalibration_steps: int = 20
    cpu_replicas: int | None = None  # TF only: MirroredStrategy over this many logical CPUs (tests)
    verbose: int | str = "auto"  # Keras fit verbosity: progress bar by default
    keep_checkpoints: int = 2

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
    from hpa_nb import data
    from hpa_nb.labels import label_matrix

    frame = data.load_labels(root)
    ids = frame["ID"].tolist()
    matrix = label_matrix(ids, frame["Label"])
    if reuse and (run_dir / SPLIT_FILE).is_file():
        saved = load_split(run_dir)
        train_ids, val_ids = saved["train"], saved["val"]
    else:
        train_ids, val_ids = data.split(ids, matrix, config.val_fraction, config.seed)
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


# --- callbacks ----------------------------------------------------------------------------
def checkpoint_path(run_dir: Path, epoch: int) -> Path:
    """The checkpoint written after `epoch` epochs (1-based)."""
    return run_dir / CHECKPOINT_DIR / f"epoch-{epoch:03d}.keras"


def last_checkpoint(run_dir: Path) -> tuple[int, Path | None]:
    """(epochs finished, their checkpoint), or (0, None) when the run has none."""
    found = sorted((run_dir / CHECKPOINT_DIR).glob("epoch-*.keras"))
    if not found:
        return 0, None
    return int(found[-1].stem.split("-")[1]), found[-1]


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


def _checkpoint_callback(run_dir: Path, keep: int):
    import keras

    class AtomicCheckpoint(keras.callbacks.Callback):
        """Save the full model (optimizer included) after every epoch, atomically; keep the last `keep`."""

        def on_epoch_end(self, epoch, logs=None):
            (run_dir / CHECKPOINT_DIR).mkdir(exist_ok=True)
            with atomic_path(checkpoint_path(run_dir, epoch + 1)) as temporary:  # ends in .keras, as Keras requires
                self.model.save(temporary)
            for old in sorted((run_dir / CHECKPOINT_DIR).glob("epoch-*.keras"))[:-keep]:
                old.unlink()

    return AtomicCheckpoint()


def _recalibration_callback(dataset, steps: int):
    import keras

    class BatchNormRecalibration(keras.callbacks.Callback):
        """Re-estimate batch-norm statistics just before each validation pass inside ``fit``.

        Keras calls ``on_test_begin`` after the epoch's training steps (and, on JAX, after the
        weights are synced back to the model), so the validation and the checkpoint written at the
        end of the epoch both see the re-estimated statistics; training runs in training mode and
        is unaffected by them.
        """

        def on_test_begin(self, logs=None):
            recalibrate_batch_norm(self.model, dataset, steps)

    return BatchNormRecalibration()


# --- batch-norm statistics ----------------------------------------------------------------
def _batch_norm_layers(model) -> list:
    import keras

    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found += _batch_norm_layers(layer)
        elif isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
    return found


def recalibrate_batch_norm(model, dataset, steps: int) -> int:
    """Re-estimate every batch norm's moving statistics as the plain average over `steps` batches.

    In short runs the moving averages (momentum 0.99) lag far behind weights that change fast,
    and inference-mode predictions fall to near chance. This runs forward passes in training
    mode (no gradient step) with the momentum set so each batch gets an equal share. Returns the
    number of batches used.
    """
    layers = _batch_norm_layers(model)
    if not layers or steps <= 0:
        return 0
    momenta = [layer.momentum for layer in layers]
    used = 0
    try:
        for batch in dataset.take(steps).as_numpy_iterator():
            for layer in layers:  # running mean: moving = moving * k/(k+1) + batch / (k+1)
                layer.momentum = used / (used + 1)
            model(batch[0], training=True)
            used += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return used


# --- training -----------------------------------------------------------------------------
def learning_rate_schedule(config: TrainConfig, steps_per_epoch: int, global_batch: int):
    """The warmup → sustain → decay schedule training uses, for a run of `config` (plotted in 03_train)."""
    from hpa_nb import schedule

    return schedule.from_epochs(
        steps_per_epoch, global_batch, max_lr=config.max_lr, initial_lr=config.initial_lr,
        warmup_epochs=config.warmup_epochs, sustain_epochs=config.sustain_epochs, decay=config.lr_decay,
        min_lr=config.min_lr)


def _compile(model, config: TrainConfig, positive_weights: np.ndarray, label_weights: np.ndarray,
             steps_per_epoch: int, global_batch: int, steps_per_execution: int) -> None:
    import keras

    from hpa_nb.model import WeightedBinaryCrossentropy, make_metrics

    learning_rate = learning_rate_schedule(config, steps_per_epoch, global_batch)
    gamma = config.focal_gamma if config.loss == "focal" else 0.0
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=WeightedBinaryCrossentropy(positive_weights, focal_gamma=gamma),
                  metrics=make_metrics(label_weights), steps_per_execution=steps_per_execution)


def train(config: TrainConfig) -> TrainResult:
    """Train a model as `config` says and write the run folder ``config.out_dir``.

    Validates on the held-out split after every epoch, checkpoints every epoch (``resume=True``
    continues after the last finished one, the LR schedule at that step), stops early on the
    validation macro AUC keeping the best weights, and stops on a NaN loss. Batch-norm statistics
    are re-estimated over training batches before each validation (``bn_recalibration``), so the
    saved model predicts well in inference mode even after a short run.
    """
    import keras
    import pandas as pd

    from hpa_nb.accelerator import detect
    from hpa_nb.labels import class_weights
    from hpa_nb.model import build

    _validate(config)
    accelerator = detect(config.cpu_replicas, config.mixed_precision)  # before TF touches its devices
    keras.utils.set_random_seed(config.seed)  # weights initialisation and dropout repeat with the seed
    root = Path(config.data_dir) if config.data_dir else _discover()
    config = dataclasses.replace(config, data_dir=str(root))
    run_dir = Path(config.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not config.resume:
        clear_previous_run(run_dir)
    finished, checkpoint = last_checkpoint(run_dir) if config.resume else (0, None)
    if config.resume and checkpoint is None:
        print(f"resume: no checkpoint in {run_dir / CHECKPOINT_DIR}, starting from scratch", file=sys.stderr)
    train_ids, val_ids, train_matrix, val_matrix = _split(root, run_dir, config, reuse=config.resume)

    global_batch = accelerator.global_batch_size(config.batch_size)
    steps_per_epoch = config.steps_per_epoch or max(1, len(train_ids) // global_batch)
    steps_per_execution = min(config.steps_per_execution or accelerator.steps_per_execution, steps_per_epoch)
    runtime = {"backend": accelerator.backend, "device": accelerator.device_kind,
               "device_name": accelerator.device_name, "distribution": accelerator.path,
               "replicas": accelerator.replicas, "precision": accelerator.precision,
               "global_batch_size": global_batch, "steps_per_epoch_used": steps_per_epoch,
               "steps_per_execution_used": steps_per_execution, "train_images": len(train_ids),
               "val_images": len(val_ids), "data_fingerprint": data_fingerprint(root)}
    _write_config(run_dir, config, runtime)
    print(f"train: {accelerator.describe()}; {len(train_ids)} train / {len(val_ids)} val images, "
          f"global batch {global_batch}, {steps_per_epoch} steps per epoch", file=sys.stderr)

    train_data, val_data, recalibration_data = _datasets(root, train_ids, val_ids, config, global_batch,
                                                         accelerator.replicas)
    # Classes without both positives and negatives in validation have no AUC; leave them out.
    val_positives = val_matrix.sum(axis=0)
    label_weights = ((val_positives > 0) & (val_positives < len(val_ids))).astype(np.float32)

    with accelerator.scope():
        if checkpoint is not None:
            model = keras.saving.load_model(checkpoint)  # weights, optimizer state and step count
            print(f"resume: continuing after epoch {finished} from {checkpoint}", file=sys.stderr)
        else:
            model = build(config.backbone, config.image_size, config.channels, config.weights, config.dropout)
            _compile(model, config, class_weights(train_matrix, config.max_positive_weight), label_weights,
                     steps_per_epoch, global_batch, steps_per_execution)
    recalibration_steps = min(config.bn_recalibration_steps, steps_per_epoch)
    callbacks = _callbacks(run_dir, config, finished, recalibration_data, recalibration_steps)
    fit = model.fit(train_data, epochs=config.epochs, initial_epoch=finished, steps_per_epoch=steps_per_epoch,
                    validation_data=val_data, callbacks=callbacks, verbose=config.verbose,
                    shuffle=False)  # the dataset shuffles itself
    losses = fit.history.get("loss", [])
    if any(not np.isfinite(value) for value in losses):
        raise FloatingPointError(f"training loss became NaN/inf in {run_dir}: lower --max-lr or check the data")

    # With "epoch", the weights kept (best or last epoch) already carry statistics re-estimated for them.
    if config.bn_recalibration == "end":
        recalibrate_batch_norm(model, recalibration_data, recalibration_steps)
    final = {}
    if model.compiled:
        final = {f"val_{k}": float(v) for k, v in model.evaluate(val_data, verbose=0, return_dict=True).items()}
    with atomic_path(run_dir / MODEL_FILE) as temporary:
        model.save(temporary)
    runtime.update(epochs_run=int(finished + len(losses)), final=final)
    _write_config(run_dir, config, runtime)
    history = pd.read_csv(run_dir / HISTORY_FILE) if (run_dir / HISTORY_FILE).is_file() else pd.DataFrame()
    print(f"train: wrote {run_dir / MODEL_FILE}; validation of the saved model: "
          + ", ".join(f"{k} {v:.4f}" for k, v in final.items()), file=sys.stderr)
    return TrainResult(run_dir, model, history, final)


def _datasets(root: Path, train_ids: list[str], val_ids: list[str], config: TrainConfig, global_batch: int,
              replicas: int) -> tuple:
    """Training (infinite, augmented), validation (finite, padded for replicas) and BN re-estimation data."""
    import tensorflow as tf

    from hpa_nb import data

    common = {"image_size": config.image_size, "channels": config.channels, "batch_size": global_batch}
    train_data = data.training_dataset(root, train_ids, seed=config.seed, augment=config.augment,
                                       cache=config.cache, **common)
    val_data = data.eval_dataset(root, val_ids, with_id=False, **common)
    # A known length keeps Keras from warning "ran out of data" after every validation pass.
    val_data = val_data.apply(tf.data.experimental.assert_cardinality(math.ceil(len(val_ids) / global_batch)))
    if replicas > 1:
        val_data = pad_batches(val_data, replicas)
    # BN statistics are for inference inputs: training images without augmentation.
    recalibration_data = data.training_dataset(root, train_ids, seed=config.seed + 1, augment=False, cache=False,
                                               **common)
    return train_data, val_data, recalibration_data


def _callbacks(run_dir: Path, config: TrainConfig, finished: int, recalibration_data, recalibration_steps: int) -> list:
    import keras
    import pandas as pd

    if finished and (run_dir / HISTORY_FILE).is_file():  # drop rows of an epoch that never got its checkpoint
        history = pd.read_csv(run_dir / HISTORY_FILE)
        write_text(run_dir / HISTORY_FILE, history[history["epoch"] < finished].to_csv(index=False))
    recalibration = ([_recalibration_callback(recalibration_data, recalibration_steps)]
                     if config.bn_recalibration == "epoch" else [])
    return [
        *recalibration,  # runs before each validation, so checkpoints and early stopping see its statistics
        _checkpoint_callback(run_dir, config.keep_checkpoints),
        keras.callbacks.CSVLogger(str(run_dir / HISTORY_FILE), append=finished > 0),
        keras.callbacks.EarlyStopping(monitor=MONITOR, mode="max", patience=config.patience,
                                      restore_best_weights=True),
        keras.callbacks.TerminateOnNaN(),
    ]


def _discover() -> Path:
    from hpa_nb.env import find_data

    source = find_data()
    print(f"data: {source}", file=sys.stderr)
    return source.path


def _write_config(run_dir: Path, config: TrainConfig, runtime: dict) -> None:
    write_text(run_dir / CONFIG_FILE, json.dumps({**config.to_json(), **runtime}, indent=1) + "\n")
