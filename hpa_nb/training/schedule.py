"""Learning-rate schedule: linear warmup, sustain, exponential decay, scaled with the global batch size."""

from __future__ import annotations

import keras
from keras import ops

REFERENCE_BATCH_SIZE = 64  # max_lr is quoted for this global batch; other batches scale linearly


@keras.saving.register_keras_serializable(package="hpa_nb")
class WarmupSustainDecay(keras.optimizers.schedules.LearningRateSchedule):
    """``initial_lr`` → ``max_lr`` linearly over ``warmup_steps``, ``max_lr`` for ``sustain_steps``, then
    ``max_lr · decay ** ((step − warmup − sustain) / decay_steps)``, never below ``min_lr``.

    The schedule is a function of the optimizer's step, so a resumed run (whose optimizer keeps its
    iteration count) continues exactly where it stopped.
    """

    def __init__(
        self,
        initial_lr: float,
        max_lr: float,
        warmup_steps: int,
        sustain_steps: int = 0,
        decay: float = 0.8,
        decay_steps: int = 1,
        min_lr: float = 0.0,
    ):
        if warmup_steps < 0 or sustain_steps < 0 or decay_steps < 1:
            raise ValueError(
                f"schedule steps must be >= 0 (decay_steps >= 1): warmup {warmup_steps}, "
                f"sustain {sustain_steps}, decay {decay_steps}"
            )
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.initial_lr = float(initial_lr)
        self.max_lr = float(max_lr)
        self.warmup_steps = int(warmup_steps)
        self.sustain_steps = int(sustain_steps)
        self.decay = float(decay)
        self.decay_steps = int(decay_steps)
        self.min_lr = float(min_lr)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = float(max(self.warmup_steps, 1))
        warming = self.initial_lr + (self.max_lr - self.initial_lr) * step / warmup
        decay_start = float(self.warmup_steps + self.sustain_steps)
        decayed = self.max_lr * ops.power(self.decay, ops.maximum(step - decay_start, 0.0) / self.decay_steps)
        rate = ops.where(step < self.warmup_steps, warming, ops.maximum(decayed, self.min_lr))
        return ops.cast(rate, "float32")

    def get_config(self) -> dict:
        return {
            "initial_lr": self.initial_lr,
            "max_lr": self.max_lr,
            "warmup_steps": self.warmup_steps,
            "sustain_steps": self.sustain_steps,
            "decay": self.decay,
            "decay_steps": self.decay_steps,
            "min_lr": self.min_lr,
        }


def scaled_max_lr(max_lr: float, global_batch_size: int, reference_batch_size: int = REFERENCE_BATCH_SIZE) -> float:
    """The linear scaling rule: a batch k times larger takes a k times larger peak learning rate."""
    return max_lr * global_batch_size / reference_batch_size


def from_epochs(
    steps_per_epoch: int,
    global_batch_size: int,
    max_lr: float = 1e-3,
    initial_lr: float = 1e-5,
    warmup_epochs: float = 1.0,
    sustain_epochs: float = 0.0,
    decay: float = 0.8,
    min_lr: float = 1e-6,
    reference_batch_size: int = REFERENCE_BATCH_SIZE,
) -> WarmupSustainDecay:
    """The schedule in epochs (decaying by ``decay`` once per epoch), with max_lr scaled to the global batch.

    ``max_lr`` is the peak for ``reference_batch_size`` images per step (64 by default).
    """
    peak = scaled_max_lr(max_lr, global_batch_size, reference_batch_size)
    return WarmupSustainDecay(
        initial_lr=min(initial_lr, peak),
        max_lr=peak,
        warmup_steps=round(warmup_epochs * steps_per_epoch),
        sustain_steps=round(sustain_epochs * steps_per_epoch),
        decay=decay,
        decay_steps=max(steps_per_epoch, 1),
        min_lr=min_lr,
    )
