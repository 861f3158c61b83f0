"""The callbacks `fit` trains with, besides Keras's own: each epoch's history row and checkpoint (`epoch_recorder`),
batch-norm statistics re-estimated before each validation (`recalibration`), and the projection and deadline
(`clock`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import keras

from hpa_nb.core.budget import Projection
from hpa_nb.core.files import atomic_path
from hpa_nb.training import hosts, run
from hpa_nb.training.batch_norm import recalibrate

logger = logging.getLogger(__name__)


def epoch_recorder(run_dir: Path, keep: int, several: hosts.Hosts = hosts.Hosts()):
    folder = run.RunFolder(run_dir)

    class EpochRecorder(keras.callbacks.Callback):
        """After every epoch: its row of history.csv, then the full checkpoint (optimizer included).

        Both are written atomically, the history first. A run killed between the two leaves a row
        without a checkpoint, which the resumed run drops and writes again; never a checkpoint
        whose epoch is missing from the history.
        """

        def on_epoch_end(self, epoch, logs=None):
            run.append_history(run_dir, epoch, logs or {})
            folder.checkpoints.mkdir(exist_ok=True)
            with atomic_path(folder.checkpoint(epoch + 1)) as temporary, hosts.alone(several):  # ends in .keras
                self.model.save(temporary)
            run.prune_checkpoints(run_dir, keep)

    return EpochRecorder()


def recalibration(dataset, steps: int):

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


def clock(plan):
    """Projects the run's time from its first steps, and stops it at the deadline after the epoch in hand."""

    config = plan.config
    images_per_epoch = plan.steps_per_epoch * plan.global_batch
    hours = None if config.runtime.deadline is None else (config.runtime.deadline - time.time()) / 3600

    class Clock(keras.callbacks.Callback):
        """Prints the projection of all epochs once: from the steps after the first compiled call (compiling is not
        training) up to a quarter of the first epoch, or, for an epoch too short for that, from the whole first
        epoch. After each epoch it stops the run if the next one would end past the deadline; it runs after the
        epoch's checkpoint is written, so a stopped run resumes after that epoch."""

        def __init__(self):
            super().__init__()
            self.epoch_started, self.first = 0.0, None  # first: (time, step) at the end of the first compiled call
            self.epoch_seconds: list[float] = []
            self.projected = self.stopped_at_deadline = False

        def project(self, seconds_per_image: float, what: str) -> None:
            self.projected = True
            if not plan.hosts.writer:  # one projection per run, not one per host
                return
            projection = Projection(
                "training",
                "epoch",
                config.optimisation.epochs,
                plan.finished_epochs,
                seconds_per_image * images_per_epoch,
                hours=hours,
            )
            logger.info(
                f"{projection.line()} ({what}: {seconds_per_image * 1e3:.3g} ms per image, {images_per_epoch} "
                "images per epoch)"
            )

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch_started = time.time()

        def on_train_batch_end(self, batch, logs=None):
            if self.projected:
                return
            if self.first is None:
                self.first = (time.time(), batch)
            elif batch - self.first[1] >= max(1, plan.steps_per_epoch // 4):
                seconds = (time.time() - self.first[0]) / ((batch - self.first[1]) * plan.global_batch)
                self.project(seconds, "training steps only")

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_seconds.append(time.time() - self.epoch_started)
            if not self.projected:
                self.project(self.epoch_seconds[0] / images_per_epoch, "the first epoch, compiling included")
            # Every host stops after the same epoch: host 0's clock decides for all.
            if config.runtime.deadline is not None and hosts.agree(
                time.time() + max(self.epoch_seconds) > config.runtime.deadline, plan.hosts
            ):
                self.model.stop_training = True
                self.stopped_at_deadline = epoch + 1 < config.optimisation.epochs
                if self.stopped_at_deadline and plan.hosts.writer:
                    logger.info(
                        f"train: stopping after epoch {epoch + 1} of {config.optimisation.epochs}: the next one would end past "
                        "the deadline (HOURS); its checkpoint is saved, resume from this output"
                    )

    return Clock()
