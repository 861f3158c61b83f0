"""Training over several hosts (`hpa_nb.training.hosts`): which hosts a run has, and two `train` processes on
127.0.0.1 with 4 virtual CPU devices each, joined by JAX over gloo, as the hosts of a TPU pod slice would be."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import tpu_venv_python, xla_flags

from hpa_nb.cli import main
from hpa_nb.data.pipeline import read_trace
from hpa_nb.training import hosts
from hpa_nb.training.hosts import Hosts
from hpa_nb.training.plan import load_checkpoint
from hpa_nb.training.run import RunFolder

REPO = Path(__file__).resolve().parents[1]


# --- which hosts --------------------------------------------------------------------------------------------------
def test_hosts_come_from_the_options_then_kerass_variables_then_the_tpu_slice():
    assert hosts.from_options("10.0.0.2:8476", 4, 3, environ={}) == Hosts(4, 3, "10.0.0.2:8476")
    keras_variables = {
        "KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.2:1234,10.0.0.3:1234",
        "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
        "KERAS_DISTRIBUTION_PROCESS_ID": "1",
    }
    assert hosts.from_options(environ=keras_variables) == Hosts(2, 1, "10.0.0.2:1234")
    gke = {"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3", "TPU_WORKER_ID": "2"}
    assert hosts.from_environment(gke) == Hosts(4, 2)  # the coordinator is left to JAX
    answers = {"worker-network-endpoints": "a:0:10.0.0.5,b:1:10.0.0.6", "agent-worker-number": "1"}
    assert hosts.from_environment({}, metadata=answers.get) == Hosts(2, 1)
    one_vm = {"worker-network-endpoints": "a:0:10.0.0.5", "agent-worker-number": "0"}  # a v5e-8: one host
    assert hosts.from_environment({}, metadata=one_vm.get) == Hosts()
    assert hosts.from_environment({}) == Hosts() and not Hosts().several and Hosts().writer


def test_a_host_feeds_its_rows_of_every_global_batch():
    assert [Hosts(4, index).rows(16) for index in range(4)] == [slice(0, 4), slice(4, 8), slice(8, 12), slice(12, 16)]
    batches = tf.data.Dataset.range(24).batch(8).map(lambda values: (values, -values))
    second = [values for values, _ in hosts.local_rows(batches, Hosts(2, 1)).as_numpy_iterator()]
    assert [list(values) for values in second] == [[4, 5, 6, 7], [12, 13, 14, 15], [20, 21, 22, 23]]
    assert "writes the run folder" in Hosts(2, 0, "h:1").describe() and "host 0 writes" in Hosts(2, 1).describe()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--coordinator", "127.0.0.1:1234"], "--coordinator, --num-processes and --process-id together"),
        (
            ["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
            "process id 2 is outside 0..1",
        ),
        # the tests' backend is TensorFlow: several hosts need JAX's, and nothing is written before that is known
        (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "0"], "needs KERAS_BACKEND=jax"),
    ],
)
def test_host_options_that_do_not_fit_are_one_line_exit_2(arguments, message, small_sample, tmp_path, capsys):
    assert main(["train", "--quick", "--data", str(small_sample), "--out", str(tmp_path / "run"), *arguments]) == 2
    assert not (tmp_path / "run").exists()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


# --- two processes as two hosts -----------------------------------------------------------------------------------
# Both hosts and the one-process run train the same way: the tiny CNN at 32 px, 2 images per device on 8 devices
# (a global batch of 16), on a split of 32 training and 8 validation images, so an epoch is one pass of 2 steps.
RUN = ("--quick", "--image-size", "32", "--weights", "none", "--batch-size", "2", "--patience", "10")
# A write under the run folder, by any process that imports this: an audit hook logs it (one line per write).
WATCH = """
import os, sys
watched, log = os.environ.get("HPA_TEST_WATCH"), os.environ.get("HPA_TEST_WRITES")
if watched and log:
    watched = os.path.realpath(watched)
    mutations = {"os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "shutil.copyfile", "os.truncate"}

    def inside(path):
        return isinstance(path, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(path)).startswith(watched)

    def writes(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and set(mode) & set("wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))
            paths = [path] if writing else []
        else:
            paths = list(args[:2]) if event in mutations else []
        for path in paths:
            if inside(path):
                with open(log, "a") as out:
                    out.write(f"{event} {os.fsdecode(path)}\\n")

    sys.addaudithook(writes)
"""
# How close the two-host run must stay to one process with 8 devices. Both feed the same global batches with the same
# augmentation (asserted exactly, from the traces), from the same weights; what differs is only the order of the sums
# across devices (gloo between the processes, XLA's own inside one), about 1e-7 in a gradient. Adam's first steps
# divide each gradient element by its own size, so an element whose true gradient is about 0 (a conv kernel feeding
# a batch norm) takes a step of +lr or -lr on that rounding alone: measured on an AMD EPYC without AVX-512, conv
# kernels part by 4% after 2 steps, and the third epoch's val_auc (8 images: one swapped pair moves it by 0.009) by
# 0.0089; other CPUs gave 2e-4. So:
# - with the learning rate at 0 nothing amplifies, and the two must agree to rounding (measured 2.4e-7 in
#   history.csv, 3e-7 in oof.csv, which holds 6 decimals): TIGHT, on any CPU;
# - trained for real, the histories only have to tell a run that trained the same way from one that did not
#   (a host on other rows, a lost epoch, a schedule started again): LOOSE.
TIGHT, LOOSE = 1e-5, 0.05


@pytest.fixture(scope="module")
def hosts_sample(tmp_path_factory) -> tuple[Path, Path]:
    """A 40-image sample and a split CSV holding out 8 of them."""
    from hpa_nb.sample.writer import write_sample

    root = tmp_path_factory.mktemp("hosts_sample")
    write_sample(root / "data", images=40, size=64, seed=1, bit_depth=8, test_images=4, progress=False)
    ids = pd.read_csv(root / "data" / "train.csv", dtype=str)["ID"].tolist()
    split = root / "split.csv"
    pd.DataFrame({"ID": ids, "subset": ["train"] * 32 + ["val"] * 8}).to_csv(split, index=False)
    return root / "data", split


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# XLA:CPU in jax 0.12 (the December set) fuses some bfloat16 graphs into YNNPACK calls that give inf and NaN: the
# tiny CNN's first max pooling after its batch norms, in the compiled predict step only (measured: every validation
# and held-out prediction NaN, the training loss the same as jax 0.10's). A TPU compiles without YNNPACK, so the
# tests emulating one on the CPU turn those fusions off.
NO_YNNPACK = "--xla_cpu_experimental_ynn_fusion_type="


def _environment(devices: int, trace: Path, watch: Path | None = None, writes: Path | None = None) -> dict:
    environ = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": xla_flags(f"--xla_force_host_platform_device_count={devices}", NO_YNNPACK),
        "HPA_TRACE_IDS": str(trace),
    }
    trace.mkdir(parents=True, exist_ok=True)
    if watch is not None:
        environ.update(
            PYTHONPATH=f"{watch.parent / 'hook'}{os.pathsep}{REPO}",
            HPA_TEST_WATCH=str(watch),
            HPA_TEST_WRITES=str(writes),
        )
    return environ


def _train(arguments: list[str], python: str = sys.executable) -> list[str]:
    return [python, "-m", "hpa_nb", "train", *arguments]


def _two_hosts(
    arguments: list[str],
    out: Path,
    trace: Path,
    stop_at: Path | None = None,
    timeout: float = 420,
    python: str = sys.executable,
    per_host: tuple[list[str], list[str]] = ([], []),
) -> tuple[float, list[str]]:
    """Run `train` as hosts 0 and 1 of a fresh coordinator, each with `arguments` and its own `per_host` ones; with
    `stop_at`, SIGKILL both once it exists, as a preempted slice would be. Returns the wall time and each host's
    stderr; stops both if one fails."""
    (out.parent / "hook").mkdir(exist_ok=True)
    (out.parent / "hook" / "sitecustomize.py").write_text(WATCH)
    coordinator = f"127.0.0.1:{_free_port()}"
    logs = [out.parent / f"host{index}.log" for index in range(2)]
    processes = []
    started = time.monotonic()
    for index in range(2):
        environ = _environment(4, trace, watch=out, writes=out.parent / f"writes-host{index}.txt")
        command = _train(
            [
                *arguments,
                *per_host[index],
                "--coordinator",
                coordinator,
                "--num-processes",
                "2",
                "--process-id",
                str(index),
            ],
            python,
        )
        processes.append(
            subprocess.Popen(command, env=environ, stdout=subprocess.DEVNULL, stderr=logs[index].open("w"))
        )
    try:
        while any(process.poll() is None for process in processes):
            failed = [process for process in processes if process.returncode not in (None, 0)]
            if failed and stop_at is None:
                raise AssertionError(f"a host failed: {logs[processes.index(failed[0])].read_text()[-3000:]}")
            if stop_at is not None and stop_at.is_file():
                for process in processes:
                    process.send_signal(signal.SIGKILL)
                break
            assert time.monotonic() - started < timeout, "the two hosts did not finish in time"
            time.sleep(0.02)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
    seconds = time.monotonic() - started
    errors = [log.read_text() for log in logs]
    if stop_at is not None:
        assert [process.returncode for process in processes] == [-signal.SIGKILL] * 2, errors[0][-2000:]
    else:
        assert [process.returncode for process in processes] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    return seconds, errors


def _fed(trace: Path, host: int, epoch: int, per_epoch: int = 16) -> list[str]:
    """The IDs host `host` fed in the `epoch`-th epoch its process trained (the trace runs ahead: prefetching)."""
    return read_trace(trace / f"train-ids-host{host}.txt")[epoch * per_epoch : (epoch + 1) * per_epoch]


@pytest.mark.slow
def test_two_hosts_train_as_one_with_one_writer_resume_together_and_match_one_process(hosts_sample, tmp_path):
    """A TPU's steps (two per compiled call, an epoch rounded down to whole calls) on two hosts, killed and resumed,
    against one process with 8 devices stopped and resumed in a new process the same way. (In float32: bfloat16's
    rounding moves the 8 validation images' mAP by 0.09 between the two; the December test trains in it.)"""
    data, split = hosts_sample
    tpu = ["--steps-per-execution", "2", "--steps-per-epoch", "3"]
    base = [*RUN, *tpu, "--data", str(data), "--split-from", str(split)]
    slice_dir = tmp_path / "slice"
    slice_dir.mkdir()
    run = slice_dir / "run"
    train_ids = pd.read_csv(split, dtype=str).query("subset == 'train'")["ID"].tolist()

    # Two epochs of three, then both hosts killed once the second epoch's checkpoint is written.
    first_seconds, killed = _two_hosts(
        [*base, "--out", str(run), "--epochs", "3"], run, slice_dir / "trace-1", stop_at=RunFolder(run).checkpoint(2)
    )
    assert not RunFolder(run).model.is_file()
    assert "train: 2 steps per epoch, not 3: a whole number of compiled calls of 2 steps" in killed[0]
    # Resumed on both hosts, from the same epoch and batch.
    resumed_seconds, errors = _two_hosts(["--resume", "--out", str(run), "--epochs", "3"], run, slice_dir / "trace-2")
    for index, error in enumerate(errors):
        assert f"hosts: host {index} of 2" in error and "8 devices in all, 4 here" in error
        assert "continuing after epoch 2" in error
    info = json.loads(RunFolder(run).config.read_text())
    assert (info["replicas"], info["hosts"], info["global_batch_size"], info["steps_per_epoch_used"]) == (8, 2, 16, 2)
    assert (info["backend"], info["distribution"], info["precision"], info["steps_per_execution_used"]) == (
        "jax",
        "DataParallel",
        "float32",
        2,
    )
    history = pd.read_csv(RunFolder(run).history)
    assert history["epoch"].tolist() == [0, 1, 2] and info["epochs_run"] == 3

    # One writer: host 1 wrote nothing in the run folder, host 0 everything there.
    assert not (slice_dir / "writes-host1.txt").exists()
    written = (slice_dir / "writes-host0.txt").read_text()
    for name in ("history.csv", "epoch-003.keras", "model.keras", "oof.csv", "config.json", "split.csv"):
        assert name in written

    # Every training image once per epoch across the hosts, none on both hosts in one epoch.
    for trace, epoch in ((slice_dir / "trace-1", 0), (slice_dir / "trace-1", 1), (slice_dir / "trace-2", 0)):
        first, second = _fed(trace, 0, epoch), _fed(trace, 1, epoch)
        assert len(first) == len(second) == 16 and not set(first) & set(second)
        assert sorted(first + second) == sorted(train_ids)

    # The same run as one process with 8 devices, stopped after the same epoch and resumed: the same batches, the
    # same history. (Resuming starts new dropout masks, one process or several, so the reference resumes too.)
    single = tmp_path / "single"
    started = time.monotonic()
    for arguments in ([*base, "--epochs", "2"], ["--resume", "--epochs", "3"]):
        done = subprocess.run(
            _train([*arguments, "--out", str(single / "run")]),
            env=_environment(8, single / "trace"),
            capture_output=True,
            text=True,
            timeout=420,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "continuing after epoch 2" in done.stderr or "--resume" not in arguments
    single_seconds = time.monotonic() - started
    reference = json.loads(RunFolder(single / "run").config.read_text())
    assert (reference["replicas"], reference["hosts"], reference["steps_per_execution_used"]) == (8, 1, 2)
    # the steps the schedule and the stream count, over the kill: 3 epochs of 2 (host 0's and the one process's)
    assert _iterations(RunFolder(run).checkpoint(3)) == _iterations(RunFolder(single / "run").checkpoint(3)) == 6
    alone = pd.read_csv(RunFolder(single / "run").history)
    assert alone.columns.tolist() == history.columns.tolist()
    np.testing.assert_allclose(history.to_numpy(), alone.to_numpy(), rtol=0, atol=LOOSE)
    oof, reference = _oof_pair(run, single / "run")
    np.testing.assert_allclose(oof.to_numpy(), reference.to_numpy(), rtol=0, atol=LOOSE)
    one_stream = read_trace(single / "trace" / "train-ids-host0.txt")
    for step in range(4):  # the hosts' rows of each global batch, side by side, are the one process's batch
        assert (
            _fed(slice_dir / "trace-1", 0, step, 8) + _fed(slice_dir / "trace-1", 1, step, 8)
            == one_stream[step * 16 : (step + 1) * 16]
        )
    print(
        f"\ntwo hosts: {first_seconds:.1f} s to the kill, {resumed_seconds:.1f} s resumed; one process: "
        f"{single_seconds:.1f} s (two runs); largest difference: history "
        f"{np.abs(history.to_numpy() - alone.to_numpy()).max():.2g}, oof.csv "
        f"{np.abs(oof.to_numpy() - reference.to_numpy()).max():.2g}"
    )


def _iterations(checkpoint: Path) -> int:
    """The optimizer's step count saved in a checkpoint (a JAX run's, read with this process's backend)."""
    return int(load_checkpoint(checkpoint).optimizer.iterations.numpy())


def _oof_pair(run: Path, single: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The held-out predictions of the two-host run and of the one-process run, in the same row order."""
    oof = pd.read_csv(RunFolder(run).oof).set_index("ID")
    return oof, pd.read_csv(RunFolder(single).oof).set_index("ID").loc[oof.index]


@pytest.mark.slow
def test_two_hosts_compute_what_one_process_computes_to_rounding_on_any_cpu(hosts_sample, tmp_path):
    """Two epochs at learning rate 0: the forward passes, losses, metrics, batch-norm statistics, validation and
    held-out predictions of two hosts against one process, with no optimizer step to amplify the rounding."""
    data, split = hosts_sample
    base = [*RUN, "--data", str(data), "--split-from", str(split), "--epochs", "2", "--max-lr", "0"]
    run, single = tmp_path / "slice" / "run", tmp_path / "single" / "run"
    run.parent.mkdir()
    _two_hosts([*base, "--out", str(run)], run, tmp_path / "slice" / "trace")
    done = subprocess.run(
        _train([*base, "--out", str(single)]),
        env=_environment(8, tmp_path / "single" / "trace"),
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    history, alone = pd.read_csv(RunFolder(run).history), pd.read_csv(RunFolder(single).history)
    assert history["epoch"].tolist() == [0, 1] and history.columns.tolist() == alone.columns.tolist()
    np.testing.assert_allclose(history.to_numpy(), alone.to_numpy(), rtol=0, atol=TIGHT)
    oof, reference = _oof_pair(run, single)
    np.testing.assert_allclose(oof.to_numpy(), reference.to_numpy(), rtol=0, atol=TIGHT)


@pytest.mark.slow
def test_two_hosts_train_with_the_tpu_images_december_packages_and_stop_together_at_host_0s_deadline(
    hosts_sample, tmp_path
):
    """The same two hosts with jax 0.12 and Keras as Kaggle's TPU image holds them in December 2026, in a TPU's
    mixed_bfloat16, each with its own clock: host 0's deadline is already past, host 1's is days away. Host 0 decides for both (`hosts.agree`), so
    both stop after the first epoch of three with the checkpoint saved and exit 0; a host that went on alone would
    wait for the other in its next collective until the timeout."""
    data, split = hosts_sample
    run = tmp_path / "run"
    _, errors = _two_hosts(
        [*RUN, "--data", str(data), "--split-from", str(split), "--out", str(run), "--epochs", "3"]
        + ["--precision", "mixed_bfloat16"],
        run,
        tmp_path / "trace",
        python=str(tpu_venv_python("2026-12")),
        per_host=(["--hours", "1e-9"], ["--hours", "100"]),
    )
    assert "python 3.12" in errors[0] and "jax 0.12" in errors[0] and "8 devices in all, 4 here" in errors[1]
    stopping = "train: stopping after epoch 1 of 3: the next one would end past the deadline"
    assert stopping in errors[0] and stopping not in errors[1]  # decided by both, said by the writer
    info = json.loads(RunFolder(run).config.read_text())
    assert (info["replicas"], info["hosts"], info["epochs_run"], info["stopped_at_deadline"]) == (8, 2, 1, True)
    assert info["precision"] == "mixed_bfloat16" and RunFolder(run).checkpoint(1).is_file()
    history = pd.read_csv(RunFolder(run).history)
    assert history["epoch"].tolist() == [0] and np.isfinite(history[["loss", "val_loss"]].to_numpy()).all()
    assert RunFolder(run).oof.is_file()
    assert not (tmp_path / "writes-host1.txt").exists() and "model.keras" in (tmp_path / "writes-host0.txt").read_text()
