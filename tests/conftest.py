"""Shared fixtures: small synthetic data sets in the competition layout, made once per session."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Most of the time the tests' XLA programs take to compile on a CPU (tiny models, run for a few steps) is LLVM's
# optimisation, which buys nothing at these sizes: measured on 2 cores, a quick training process on 8 JAX devices took
# 57 s with it and 46 s without, and loading a KerasHub backbone 28 s and 18 s. Without it the code runs slower and
# rounds differently, computing the same thing. So the tests, and every process they start, compile without it.
# (Keras on TensorFlow uses no XLA on a CPU; JAX always does.)
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(*flags: str) -> str:
    """XLA_FLAGS for a process a test starts: `flags` and `FAST_COMPILE`."""
    return " ".join((*flags, FAST_COMPILE))


os.environ["XLA_FLAGS"] = xla_flags(*os.environ.get("XLA_FLAGS", "").split())

import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402

from hpa_nb.cli import main  # noqa: E402
from hpa_nb.core import log  # noqa: E402
from hpa_nb.data.tiles import write_tiles  # noqa: E402
from hpa_nb.sample.sources import ensure_default_sample  # noqa: E402
from hpa_nb.sample.writer import write_sample  # noqa: E402
from hpa_nb.training.config import TrainConfig  # noqa: E402
from hpa_nb.training.train import TrainResult, train  # noqa: E402


@pytest.fixture(autouse=True)
def _package_log():
    """Each test starts with the package's own log handler at its default level (a CLI run's -q ends with it)."""
    yield
    log.setup()


@pytest.fixture(scope="session")
def small_sample(tmp_path_factory) -> Path:
    """40 training images at 64 px and 4 test images: fast enough for any test."""
    root = tmp_path_factory.mktemp("small_sample")
    write_sample(root, images=40, size=64, seed=1, bit_depth=8, test_images=4, progress=False)
    return root


@pytest.fixture(scope="session")
def trained_result(small_sample, tmp_path_factory) -> TrainResult:
    """What `hpa_nb.training.train.train` returns for a run of its own: two short epochs (two steps each) of the
    tiny CNN at 32 px on `small_sample` (a quarter held out, seed 3), with the model still in memory. For the
    tests that need a model and its run folder, not a good model: the 03_train notebook checks that the quick
    model learns."""
    config = TrainConfig.quick_variant(
        data_dir=str(small_sample),
        out_dir=str(tmp_path_factory.mktemp("trained_run")),
        image_size=32,
        epochs=2,
        batch_size=4,
        steps_per_epoch=2,
        val_fraction=0.25,
        seed=3,
        verbose=0,
    )
    return train(config)


@pytest.fixture(scope="session")
def trained_run(trained_result) -> Path:
    """The folder of `trained_result`."""
    return trained_result.run_dir


@pytest.fixture(scope="session")
def trained_cell_run(small_sample, tmp_path_factory) -> Path:
    """A cell run written by `train` itself on `small_sample`'s tiles (its true cells, 32 px): the same
    split settings as `trained_run` (a quarter held out, seed 3), two short epochs of the tiny CNN."""
    tiles = tmp_path_factory.mktemp("cell_tiles") / "tiles"
    write_tiles(small_sample, tiles, size=32, segmentation="masks", progress=False)
    config = TrainConfig.quick_variant(
        data_dir=str(small_sample),
        out_dir=str(tmp_path_factory.mktemp("cell_run")),
        level="cell",
        tiles=str(tiles),
        image_size=32,
        epochs=2,
        batch_size=4,
        steps_per_epoch=2,
        val_fraction=0.25,
        seed=3,
        verbose=0,
    )
    return train(config).run_dir


@pytest.fixture(scope="session")
def default_sample() -> Path:
    """The default sample that every command falls back to (cached under HPA_CACHE)."""
    return ensure_default_sample()


# Kaggle's TPU image as two package sets: the August 2026 resolution and the same recipe resolved on 2026-12-05.
TPU_PACKAGE_SETS = {
    "2026-08": ("requirements-kaggle-tpu.txt", "HPA_TPU_VENV"),
    "2026-12": ("requirements-kaggle-tpu-2026-12.txt", "HPA_TPU_VENV_2026_12"),
}


def tpu_venv_python(package_set: str) -> Path:
    """The interpreter of a Python 3.12 venv of exactly one package set of Kaggle's TPU image: its environment
    variable's venv (`make test` sets both), or built (or found in the cache) by .ci/kaggle-tpu-venv. Where
    `make test` found no Python 3.12 outside CI, it set HPA_NO_PYTHON312 and these tests are skipped, said once."""
    requirements, variable = TPU_PACKAGE_SETS[package_set]
    if os.environ.get("HPA_NO_PYTHON312"):
        pytest.skip("no Python 3.12 on this machine: the checks in Kaggle's TPU image were not run")
    venv = os.environ.get(variable)
    if not venv:
        built = subprocess.run(
            ["bash", str(Path(__file__).resolve().parents[1] / ".ci" / "kaggle-tpu-venv"), requirements],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert built.returncode == 0, built.stderr.strip().splitlines()[-1]  # e.g. no Python 3.12: never a skip
        venv = built.stdout.strip().splitlines()[-1]
    python = Path(venv) / "bin" / "python"
    assert python.is_file(), f"{venv} is not a venv"
    return python


@pytest.fixture(scope="session")
def tpu_python() -> Path:
    """The August package set's interpreter (`tpu_venv_python`): the set the Kaggle chain runs its TPU kernels in."""
    return tpu_venv_python("2026-08")


@pytest.fixture(scope="session")
def tpu_python_december() -> Path:
    """The December package set's interpreter (keras-hub 0.32)."""
    return tpu_venv_python("2026-12")


@dataclass
class CliResult:
    status: int
    out: str
    err: str

    @property
    def errors(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error: ")]

    def assert_one_error_line(self, expected: str) -> None:
        """Exit status 2 and exactly ``error: {expected}`` on stderr, without a traceback or TF's graph noise."""
        assert self.status == 2, self.err[-3000:]
        assert self.errors == [f"error: {expected}"], self.err[-3000:]
        assert not any(noise in self.err for noise in ("Traceback", "[[", "IteratorGetNext"))


@pytest.fixture
def cli(capfd, monkeypatch, tmp_path):
    """``python -m hpa_nb ARGS`` run in this process (`hpa_nb.cli.main`): a `CliResult` with what reached
    stdout and stderr, C-level writes included. Run folders default to ``tmp_path/out``."""
    monkeypatch.delenv("HPA_DEBUG", raising=False)
    monkeypatch.setenv("HPA_OUT", str(tmp_path / "out"))

    def run(*arguments) -> CliResult:
        capfd.readouterr()
        try:
            status = main([str(argument) for argument in arguments])
        except SystemExit as stop:  # argparse's own usage errors
            status = stop.code
        captured = capfd.readouterr()
        return CliResult(status, captured.out, captured.err)

    return run


def kill_when_written(command: list[str], path: Path, environment: dict, timeout: float = 300) -> None:
    """Start `command`, SIGKILL it as soon as `path` exists (as a lost Kaggle session would), and check it died so."""
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if process.poll() is not None:
            raise AssertionError(f"the process ended before writing {path.name}: {process.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, f"no {path.name} in time"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
