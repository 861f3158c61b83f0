"""hpa_nb.training.schedule: warmup → sustain → exponential decay, scaled with the global batch."""

from __future__ import annotations

import numpy as np
import pytest

from hpa_nb.training import schedule

keras = pytest.importorskip("keras")


@pytest.fixture
def lr() -> schedule.WarmupSustainDecay:
    return schedule.WarmupSustainDecay(
        initial_lr=1e-4, max_lr=1e-3, warmup_steps=10, sustain_steps=5, decay=0.5, decay_steps=4, min_lr=1e-5
    )


def _at(lr, step: int) -> float:
    return float(lr(step))


def test_warmup_is_linear_from_initial_to_max(lr):
    assert _at(lr, 0) == pytest.approx(1e-4)
    assert _at(lr, 5) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert _at(lr, 10) == pytest.approx(1e-3)


def test_sustain_holds_max(lr):
    assert [_at(lr, step) for step in (10, 12, 15)] == pytest.approx([1e-3] * 3)


def test_decay_is_exponential_with_a_floor(lr):
    assert _at(lr, 19) == pytest.approx(5e-4)  # one decay period after warmup + sustain
    assert _at(lr, 23) == pytest.approx(2.5e-4)
    assert _at(lr, 1000) == pytest.approx(1e-5)
    curve = np.asarray(lr(np.arange(60)), np.float64)  # all steps at once, as hpa_nb.plots.training.lr_schedule asks
    assert curve.shape == (60,) and np.all(np.diff(curve[15:]) <= 1e-12)


def test_max_lr_scales_with_the_global_batch():
    single = schedule.from_epochs(steps_per_epoch=10, global_batch_size=64, max_lr=1e-3, warmup_epochs=1)
    eight = schedule.from_epochs(steps_per_epoch=10, global_batch_size=512, max_lr=1e-3, warmup_epochs=1)
    assert single.max_lr == pytest.approx(1e-3) and eight.max_lr == pytest.approx(8e-3)
    assert single.warmup_steps == 10 and single.decay_steps == 10
    assert _at(eight, 10) == pytest.approx(8e-3)


def test_schedule_works_inside_an_optimizer_and_round_trips(lr):
    restored = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(lr))
    assert isinstance(restored, schedule.WarmupSustainDecay)
    assert [_at(restored, s) for s in (0, 12, 30)] == pytest.approx([_at(lr, s) for s in (0, 12, 30)])
    optimizer = keras.optimizers.Adam(lr)
    optimizer.iterations.assign(19)
    assert float(optimizer.learning_rate) == pytest.approx(5e-4)


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError):
        schedule.WarmupSustainDecay(1e-4, 1e-3, warmup_steps=-1)
    with pytest.raises(ValueError):
        schedule.WarmupSustainDecay(1e-4, 1e-3, warmup_steps=1, decay=1.5)
