"""hpa_nb.bench: the training benchmark still times when Keras runs several steps per execution."""

from __future__ import annotations

import math

import pytest

from hpa_nb.bench import loader, train
from hpa_nb.training import accelerator


@pytest.mark.slow  # each runs a benchmark end to end
def test_bench_train_times_several_steps_per_execution(small_sample, monkeypatch):
    # Keras calls on_train_batch_end once per execution: 4 steps each, as on a GPU (8) or TPU (32).
    monkeypatch.setitem(accelerator.STEPS_PER_EXECUTION, "cpu", 4)
    summary = train(small_sample, image_size=32, batch_size=4, steps=5)
    assert summary["steps_per_execution"] == 4
    rates = summary["images_per_second"].values()
    assert len(rates) == 3 and all(math.isfinite(rate) and rate > 0 for rate in rates)


@pytest.mark.slow  # each runs a benchmark end to end
def test_bench_loader_times_the_four_readers_on_the_same_files(small_sample):
    summary = loader(small_sample, image_size=32, channels="rgby", seconds=0.2, rounds=2, shard_size=64)
    readers = ["baseline filter+zip", "floor (decode once)", "read_tfrecords", "shards 64 px"]
    assert list(summary["images_per_second"]) == readers and summary["of_floor"]["floor (decode once)"] == 1.0
    assert all(len(rates) == 2 and min(rates) > 0 for rates in summary["all_rounds"].values())
