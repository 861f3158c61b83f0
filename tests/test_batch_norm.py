"""hpa_nb.training.batch_norm: the compiled re-estimation gives what the eager one gave, on TF and on JAX over 8 devices."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import xla_flags

from hpa_nb.training.batch_norm import recalibrate

REPO = Path(__file__).resolve().parents[1]

# Runs in the test process (TF backend) and in a JAX subprocess: builds a small model with batch
# norm, perturbs its statistics, then compares the compiled and the eager re-estimation.
COMPARISON = textwrap.dedent("""
    import numpy as np
    import hpa_nb
    import keras
    from hpa_nb.training.batch_norm import batch_norm_layers, recalibrate
    from hpa_nb.bench import _Batches, eager_recalibration
    from hpa_nb.training.model import build

    def compare(batch_size):
        keras.utils.set_random_seed(0)
        model = build("tiny", image_size=32, channels=3, weights=None)
        rng = np.random.default_rng(0)
        batches = _Batches((rng.uniform(0, 255, (batch_size, 32, 32, 3)).astype("float32"),) for _ in range(5))
        layers = batch_norm_layers(model)
        assert layers, "the tiny backbone has batch norm"
        results = []
        for way in (eager_recalibration, recalibrate):
            for layer in layers:  # stale statistics, as after a short run
                layer.moving_mean.assign(np.full(layer.moving_mean.shape, 3.0, "float32"))
                layer.moving_variance.assign(np.full(layer.moving_variance.shape, 7.0, "float32"))
            assert way(model, batches, 4) == 4
            results.append([np.asarray(v) for layer in layers for v in (layer.moving_mean, layer.moving_variance)])
        for eager, compiled in zip(*results):
            np.testing.assert_allclose(compiled, eager, rtol=2e-4, atol=2e-4)
        assert all(layer.momentum == 0.99 for layer in layers), "the momentum is restored"
        assert not np.allclose(results[1][0], 3.0), "the statistics changed"
        return len(layers)
""")


def test_compiled_recalibration_equals_the_eager_one_on_one_device():
    namespace: dict = {}
    exec(COMPARISON, namespace)
    assert namespace["compare"](8) >= 4


def test_a_model_without_batch_norm_or_without_steps_is_left_alone():

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    assert recalibrate(model, [(np.zeros((2, 4), "float32"),)], 3) == 0


@pytest.mark.slow
def test_compiled_recalibration_on_eight_jax_devices_equals_the_eager_one():
    pytest.importorskip("jax")
    script = COMPARISON + textwrap.dedent("""
        import jax
        assert len(jax.devices()) == 8
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
        print("layers", compare(16))
    """)
    environ = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8"),
    }
    done = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "layers" in done.stdout
