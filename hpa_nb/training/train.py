"""Training: `train(config)` is `prepare` (`hpa_nb.training.plan`) then `fit`, which trains the planned model into
its run folder (`hpa_nb.training.run`): every epoch's history row and checkpoint, the saved model, the held-out
predictions. `image_run` finds the image run a later kernel uses, or trains a quick one where none is."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import keras
import numpy as np

from hpa_nb.core.files import atomic_path
from hpa_nb.data import pipeline
from hpa_nb.training import callbacks, feeds, inputs, predictions, run, tracking
from hpa_nb.training import hosts as hosting
from hpa_nb.training.batch_norm import recalibrate
from hpa_nb.training.config import TrainConfig
from hpa_nb.training.hosts import Hosts
from hpa_nb.training.plan import Plan, prepare

logger = logging.getLogger(__name__)

__all__ = ["MONITOR", "Plan", "TrainConfig", "TrainResult", "fit", "image_run", "prepare", "train"]


MONITOR = "val_auc"  # early stopping and "best epoch" follow the validation macro ROC AUC


@dataclass
class TrainResult:
    """What `train` returns: the run folder, the trained model and its per-epoch history."""

    run_dir: Path
    model: Any = field(repr=False)
    history: Any = field(repr=False)  # pandas DataFrame of history.csv
    final: dict = field(default_factory=dict)  # validation metrics of the saved model (after BN re-estimation)
    stopped_at_deadline: bool = False  # True when the deadline ended it before its last epoch: resume to finish


def train(config: TrainConfig, hosts: Hosts | None = None) -> TrainResult:
    """`prepare` then `fit`: the whole run, as the CLI does it, with the plan's summary on stderr."""
    plan = prepare(config, hosts)
    logger.info(plan.summary())
    return fit(plan)


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
    recalibration_steps = min(config.validation.bn_recalibration_steps, plan.steps_per_epoch)
    callbacks = _callbacks(plan, recalibration_steps)
    # None, said in one line, when off; only the host that writes the run folder tracks it
    tracker = tracking.start(run_dir, {**config.to_json(), **plan.runtime}) if writer else None
    if tracker is not None:
        callbacks.insert(-1, tracker)  # the clock stays last
    history = model.fit(
        plan.datasets.train,
        epochs=config.optimisation.epochs,
        initial_epoch=finished,
        steps_per_epoch=plan.steps_per_epoch,
        validation_data=plan.datasets.val,
        callbacks=callbacks,
        verbose=config.runtime.verbose if writer else 0,
        shuffle=False,
    )  # the dataset shuffles itself
    stopped_at_deadline = callbacks[-1].stopped_at_deadline
    losses = history.history.get("loss", [])
    if any(not np.isfinite(value) for value in losses):
        raise FloatingPointError(f"training loss became NaN/inf in {run_dir}: lower --max-lr or check the data")

    # With "epoch", the weights kept (best or last epoch) already carry statistics re-estimated for them.
    if config.validation.bn_recalibration == "end":
        recalibrate(model, plan.datasets.recalibration, recalibration_steps)
    final = {}
    if model.compiled:
        final = {
            f"val_{k}": float(v) for k, v in model.evaluate(plan.datasets.val, verbose=0, return_dict=True).items()
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
        logger.info(f"train: host {plan.hosts.index} done; host 0 wrote {run_dir}")
        return TrainResult(run_dir, model, run.load_history(run_dir), final, stopped_at_deadline)
    run.write_info(run_dir, config, runtime)
    frame = run.load_history(run_dir)
    if tracker is not None:
        tracker.finish(final, epochs_run=runtime["epochs_run"], stopped_at_deadline=stopped_at_deadline)
    logger.info(
        f"train: wrote {run.RunFolder(run_dir).model}; validation of the saved model: "
        + ", ".join(f"{k} {v:.4f}" for k, v in final.items())
    )
    return TrainResult(run_dir, model, frame, final, stopped_at_deadline)


def _callbacks(plan: Plan, recalibration_steps: int) -> list:
    run_dir, config, finished, writer = plan.run_dir, plan.config, plan.finished_epochs, plan.hosts.writer
    if writer:  # the finished epochs' rows; not those of an epoch without its checkpoint
        run.truncate_history(run_dir, finished)
    recalibration = (
        [callbacks.recalibration(plan.datasets.recalibration, recalibration_steps)]
        if config.validation.bn_recalibration == "epoch"
        else []
    )
    return [
        *recalibration,  # runs before each validation, so checkpoints and early stopping see its statistics
        *([callbacks.epoch_recorder(run_dir, config.runtime.keep_checkpoints, plan.hosts)] if writer else []),
        keras.callbacks.EarlyStopping(
            monitor=MONITOR, mode="max", patience=config.validation.patience, restore_best_weights=True
        ),
        keras.callbacks.TerminateOnNaN(),
        callbacks.clock(plan),  # last: after the epoch's checkpoint is written
    ]


def write_held_out_predictions(plan: Plan) -> Path:
    """``RUN/oof.csv``: the saved model's predictions for every held-out image (or tile), in the
    predictions.csv format. For a fold run these are its out-of-fold predictions (`hpa_nb.training.folds`).
    Over several hosts each computes its rows of every batch (`hpa_nb.training.hosts.predictor`), and host 0 writes."""
    config, hosts = plan.config, plan.hosts
    dataset = pipeline.eval_dataset(
        plan.root,
        plan.val_ids,
        config.data.image_size,
        config.data.channels,
        plan.global_batch,
        with_id=True,
        shards=feeds.records_of(config),
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
        logger.info(f"no trained model in {found}: training a {'quick' if quick else 'full'} one first")
        train(TrainConfig.make(quick, out_dir=str(found)))
    note = run.unfinished(found)  # usable, but stopped at its deadline before all its epochs
    if note:
        logger.info(f"note: {note}")
    return found
