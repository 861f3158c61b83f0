"""hpa_nb.training.accelerator on this CPU; the multi-replica paths run in tests/test_train.py (one backend per process)."""

from __future__ import annotations

import pytest

from hpa_nb.training import accelerator

keras = pytest.importorskip("keras")


def test_cpu_is_one_float32_replica():
    found = accelerator.detect(cpu_replicas=1)
    assert (found.backend, found.device_kind, found.replicas) == (keras.backend.backend(), "cpu", 1)
    assert found.precision == "float32" and found.strategy is None and found.distribution is None
    assert found.global_batch_size(16) == 16
    assert found.steps_per_execution == 1
    assert "cpu" in found.describe()


def test_precision_follows_the_device_kind():
    computes = {kind: keras.mixed_precision.Policy(name) for kind, name in accelerator.PRECISION.items()}
    assert {kind: policy.compute_dtype for kind, policy in computes.items()} == {
        "tpu": "bfloat16",
        "gpu": "float16",
        "cpu": "float32",
    }  # what each device's matrix units are fast at
    assert all(policy.variable_dtype == "float32" for policy in computes.values())  # weights stay float32
    tpu = accelerator.Accelerator("jax", "tpu", "TPU v5 lite", 8, accelerator.PRECISION["tpu"])
    assert tpu.global_batch_size(16) == 128 and tpu.steps_per_execution > 1


def test_scope_sets_the_policy_and_restores_it():
    gpu_like = accelerator.Accelerator("tensorflow", "gpu", "test", 1, "mixed_float16")
    before = keras.mixed_precision.global_policy().name
    with gpu_like.scope():
        dense = keras.layers.Dense(2)
        probabilities = keras.layers.Dense(2, dtype="float32")
        assert keras.mixed_precision.global_policy().name == "mixed_float16"
    assert keras.mixed_precision.global_policy().name == before
    assert dense.compute_dtype == "float16" and probabilities.compute_dtype == "float32"
