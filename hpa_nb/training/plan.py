"""The plan of a run: `prepare(config)` checks everything that can fail cheaply, then builds a `Plan` (the
accelerator, the split, the data, the compiled model or the checkpoint it resumes), which `hpa_nb.training.train.fit`
trains. A notebook can show each part of it first."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from hpa_nb.core.env import on_kaggle, working_dir
from hpa_nb.core.labels import class_weights
from hpa_nb.data import combined, pipeline, tiles
from hpa_nb.sample.sources import find_data, source_record
from hpa_nb.training import feeds, inputs, preflight, run, schedule
from hpa_nb.training import hosts as hosting
from hpa_nb.training.accelerator import Accelerator, detect
from hpa_nb.training.config import TrainConfig, validate
from hpa_nb.training.feeds import Feeds
from hpa_nb.training.hosts import Hosts
from hpa_nb.training.model import build, compile_for_training
from hpa_nb.training.presets import register_classes
from hpa_nb.training.schedule import WarmupSustainDecay
from hpa_nb.training.split import split_run

logger = logging.getLogger(__name__)


def load_checkpoint(path: Path):
    """A checkpoint with its optimizer, in any process: the classes it names are registered first."""

    return keras.saving.load_model(path)


def learning_rate_schedule(config: TrainConfig, steps_per_epoch: int, global_batch: int):
    """The warmup → sustain → decay schedule training uses, for a run of `config` (plotted in 03_train)."""
    return schedule.from_epochs(
        steps_per_epoch,
        global_batch,
        max_lr=config.optimisation.max_lr,
        initial_lr=config.optimisation.initial_lr,
        warmup_epochs=config.optimisation.warmup_epochs,
        sustain_epochs=config.optimisation.sustain_epochs,
        decay=config.optimisation.lr_decay,
        min_lr=config.optimisation.min_lr,
    )


@dataclass
class Plan:
    """Everything `fit` needs, built once by `prepare`: a notebook can show each part before training."""

    config: TrainConfig  # resolved: data_dir and resume are as the run uses them
    run_dir: Path
    accelerator: Accelerator
    train_ids: list[str]
    val_ids: list[str]
    train_labels: np.ndarray  # [train images, 19]
    global_batch: int
    steps_per_epoch: int
    steps_per_execution: int
    schedule: WarmupSustainDecay  # the learning rate per optimizer step
    model: keras.Model  # compiled; on resume, loaded from the last checkpoint
    finished_epochs: int  # 0 for a fresh run
    datasets: Feeds = field(repr=False)
    runtime: dict[str, object] = field(repr=False)  # what config.json records beside the options (JSON)
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
                f"{'cells (tiles, split by image)' if self.config.cells.level == 'cell' else 'images'}",
                f"steps: global batch {self.global_batch}, {self.steps_per_epoch} steps per epoch, "
                f"{self.steps_per_execution} per compiled call",
                f"run: {self.run_dir} ({start}, {self.config.optimisation.epochs} epochs)",
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
        logger.info(
            f"train: {rounded} steps per epoch, not {steps_per_epoch}: a whole number of compiled calls of "
            f"{steps_per_execution} steps"
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
    if not config.data.extra_data:
        return Path(config.data.data_dir)
    return combined.combine([config.data.data_dir, *config.data.extra_data], working_dir())


def resolve(config: TrainConfig) -> TrainConfig:
    """`config` checked, with what it leaves open found: the data (`find_data`), the run folder (``out/run``), the
    shards and, for a cell run, the tiles. On Kaggle a full run on the synthetic sample stops here (`preflight`)."""
    validate(config)
    root = Path(config.data.data_dir) if config.data.data_dir else _discover()
    run_dir = Path(config.runtime.out_dir) if config.runtime.out_dir else run.default_dir()
    for folder in (root, *config.data.extra_data):
        preflight.check_data(Path(folder), config.runtime.quick, config.runtime.allow_sample_data)
    return config.replace(
        data_dir=str(root),
        out_dir=str(run_dir),
        resume=config.runtime.resume or bool(config.runtime.resume_from),
        shards=_find_shards(config.data.shards),
        tiles=_find_tiles(root, config) if config.cells.level == "cell" else None,
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
    hosting.start(hosts, config.data.seed)  # before JAX touches a device
    root, run_dir = data_root(config), Path(config.runtime.out_dir)
    if hosts.writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        if config.runtime.resume_from:
            run.adopt(inputs.previous_run(config.runtime.resume_from), run_dir)
    accelerator = detect(
        config.runtime.cpu_replicas, config.runtime.precision, hosts=hosts
    )  # before TF touches its devices
    preflight.check_accelerator(accelerator.device_kind, config.runtime.quick, config.runtime.allow_cpu)
    keras.utils.set_random_seed(config.data.seed)  # weights initialisation and dropout repeat with the seed
    fingerprint = run.data_fingerprint(root)
    if hosts.writer:
        if config.runtime.resume:
            check_resumable(run_dir, config, fingerprint)
        else:  # a relabelled run keeps the targets its relabel step wrote (hpa_nb.cells.relabel)
            run.clear_previous(run_dir, keep=run.RELABEL_FILES if config.cells.relabel else ())
        train_ids, val_ids, train_matrix, val_matrix = split_run(root, run_dir, config, reuse=config.runtime.resume)
    hosting.barrier("hpa_nb: the run folder is ready", hosts)  # host 0 has cleared or adopted it, and split
    if not hosts.writer:
        train_ids, val_ids, train_matrix, val_matrix = split_run(root, run_dir, config, reuse=True, writer=False)
    finished, checkpoint = run.last_checkpoint(run_dir) if config.runtime.resume else (0, None)
    _check_same_on_every_host(hosts, run_dir, finished, fingerprint)
    if config.runtime.resume and checkpoint is None:
        logger.info(f"resume: no checkpoint in {run.RunFolder(run_dir).checkpoints}, starting from scratch")
    layout = pipeline.describe_layout(root, config.data.channels, feeds.records_of(config))

    global_batch = accelerator.global_batch_size(config.optimisation.batch_size)
    steps_per_epoch, steps_per_execution = whole_executions(
        config.optimisation.steps_per_epoch or max(1, len(train_ids) // global_batch),
        config.runtime.steps_per_execution or accelerator.steps_per_execution,
        explicit=bool(config.optimisation.steps_per_epoch),
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
        "data_source": source_record(Path(config.data.data_dir)),
    }  # the first source, not a view of several
    if hosts.writer:
        run.write_info(run_dir, config, runtime)
    targets = _relabelled_targets(run_dir, train_ids) if config.cells.relabel else None
    if targets is not None:
        train_matrix = np.stack([targets[key] for key in train_ids])
    datasets = feeds.datasets(
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
            register_classes(config.model.backbone)
            model = load_checkpoint(checkpoint)  # weights, optimizer state and step count
            logger.info(f"resume: continuing after epoch {finished} from {checkpoint}")
        else:
            model = build(
                config.model.backbone,
                config.data.image_size,
                config.data.channels,
                config.model.weights,
                config.model.dropout,
            )
            compile_for_training(
                model,
                schedule,
                class_weights(train_matrix, config.optimisation.max_positive_weight),
                label_weights,
                steps_per_execution,
                focal_gamma=config.optimisation.focal_gamma if config.optimisation.loss == "focal" else 0.0,
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


def check_resumable(run_dir: Path, config: TrainConfig, fingerprint: str) -> None:
    """Refuse to resume a run with other data or other model-shaping options than it was trained with."""
    if not run.RunFolder(run_dir).config.is_file():
        return
    saved, options = run.load_info(run_dir), config.to_json()
    for name in RESUME_INVARIANTS:
        if name in saved and saved[name] != options[name]:
            raise ValueError(
                f"cannot resume {run_dir}: it was trained with {name}={saved[name]!r}, not {options[name]!r}"
            )
    if saved.get("data_fingerprint") not in (None, fingerprint):
        raise ValueError(
            f"cannot resume {run_dir}: it was trained on other data than {config.data.data_dir} "
            f"(fingerprint {saved['data_fingerprint']}, now {fingerprint})"
        )


def _find_shards(reference: str | None) -> str | None:
    """The shard folder a run reads: the one `reference` names, else on Kaggle any attached (else None)."""
    if reference is None and not on_kaggle():
        return None
    found = inputs.find("shards", reference, consumer="03_train", required=False)
    return None if found is None else str(found)


def _find_tiles(root: Path, config: TrainConfig) -> str:
    """The tile folder a cell run reads: the one `config.cells.tiles` names (a folder, or OWNER/KERNEL attached on
    Kaggle), else ``root/tiles``, else the tiles of 06_cells (on Kaggle: attached; elsewhere: out/tiles)."""
    if config.cells.tiles is None and tiles.is_tile_folder(tiles.default_dir(root)):
        return str(tiles.default_dir(root))
    if config.cells.tiles is not None and tiles.is_tile_folder(config.cells.tiles):
        return str(config.cells.tiles)
    if config.cells.tiles is not None and Path(config.cells.tiles).is_dir():
        tiles.read_manifest(config.cells.tiles)  # a folder without tiles.json stops here, named
    found = inputs.find("tiles", config.cells.tiles, consumer="07_cell_train", required=False)
    if found is None:
        raise FileNotFoundError(
            f"a cell run needs cell tiles: none in {tiles.default_dir(root)}; write them first "
            f"(python -m hpa_nb tiles --src {root}) or name them with --tiles"
        )
    return str(found)


def _discover() -> Path:
    source = find_data()
    logger.info(f"data: {source}")
    return source.path
