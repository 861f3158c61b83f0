"""Per-image work on every core (`hpa_nb.core.workers`): results in order, errors at their turn, a dead worker in one
line, no orphans after a SIGKILL; and the tile writer and the submission, byte for byte the same with 1 and 2
workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from hpa_nb.cells import submit
from hpa_nb.cells.scoring import CellClassifier
from hpa_nb.core.workers import WorkerLost, Workers, available_cores, resolve
from hpa_nb.data import tiles
from hpa_nb.sample.writer import write_sample

REPO = Path(__file__).resolve().parents[1]


def square_or_fail(item: int) -> int:
    """A worker's task for these tests: a bad item raises, item -1 kills its worker, item 1 takes a while."""
    if item == 1:
        time.sleep(0.5)
    if item == 3:
        raise ValueError(f"item {item} is bad")
    if item == -1:
        os.kill(os.getpid(), signal.SIGKILL)
    return item * item


def test_results_come_in_order_and_an_error_at_its_turn():
    with Workers(2) as workers:
        assert workers.count == 2 and workers.pool is not None
        assert list(workers.map(square_or_fail, range(3))) == [0, 1, 4]
        results = workers.map(square_or_fail, [5, 4, 3, 2])
        assert [next(results), next(results)] == [25, 16]
        with pytest.raises(ValueError, match="item 3 is bad"):
            next(results)
    with Workers(1) as workers:  # one worker: this process, nothing started
        assert workers.pool is None and list(workers.map(square_or_fail, range(3))) == [0, 1, 4]


def test_a_worker_that_dies_stops_the_map_in_one_line():
    """The line names the item the dead worker held, not the earlier item another worker was still working on (which
    the broken pool fails too, and terminates)."""
    for items in ([1, -1, 2], [0, -1, 2], [-1, 1]):
        with Workers(2) as workers:
            with pytest.raises(WorkerLost, match=r"a worker process died while working on item -1 \(killed"):
                list(workers.map(square_or_fail, items, describe=lambda item: f"item {item}"))
    assert resolve(None) == available_cores() >= 1
    with pytest.raises(ValueError, match="at least 1"):
        resolve(0)


@pytest.fixture(scope="module")
def big_sample(tmp_path_factory) -> Path:
    """A few images large enough that cutting them takes a while (16-bit, 768 px), one of them bad to read."""
    root = tmp_path_factory.mktemp("workers_sample") / "data"
    write_sample(root, images=10, size=768, seed=4, bit_depth=16, test_images=6, progress=False)
    return root


def test_tiles_are_the_same_bytes_with_one_and_two_workers(big_sample, tmp_path):
    one = tiles.write_tiles(big_sample, tmp_path / "one", size=48, images_per_file=3, workers=1, progress=False)
    two = tiles.write_tiles(big_sample, tmp_path / "two", size=48, images_per_file=3, workers=2, progress=False)
    assert one["count"] == two["count"] > 0 and len(one["files"]) == 4
    names = sorted(path.name for path in (tmp_path / "one").iterdir())
    assert names == sorted(path.name for path in (tmp_path / "two").iterdir())
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_a_submission_is_the_same_with_one_and_two_workers(big_sample, tmp_path):
    def predict(batch: np.ndarray) -> np.ndarray:  # any fixed function of the pixels
        means = batch.reshape(len(batch), -1, batch.shape[-1]).mean(axis=1)
        return np.tile(np.clip(means / 255.0, 0, 1), (1, 5))[:, :19].astype(np.float32)

    classifier = CellClassifier(predict, 32, "rgby")
    for workers in (1, 2):
        submit.write_submission(classifier, big_sample, tmp_path / f"{workers}.csv", progress=False, workers=workers)
    assert (tmp_path / "1.csv").read_bytes() == (tmp_path / "2.csv").read_bytes()
    assert len((tmp_path / "1.csv").read_text().splitlines()) == 7


def test_a_gpu_that_classical_segmentation_does_not_need_is_said(monkeypatch):
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    assert "--accelerator none" in submit.accelerator_note("classical")
    assert submit.accelerator_note("hpacellseg") == ""
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    assert submit.accelerator_note("classical") == ""


def _run_tiles(data: Path, out: Path, *extra: str) -> subprocess.Popen:
    environ = {**os.environ, "PYTHONPATH": str(REPO), "HPA_TEST_MARK": str(out)}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hpa_nb",
            "tiles",
            "--src",
            str(data),
            "--out",
            str(out),
            "--size",
            "48",
            "--images-per-file",
            "2",
            *extra,
        ],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _marked(mark: str) -> list[int]:
    """The live processes whose environment holds HPA_TEST_MARK=mark (the run and everything it started)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"HPA_TEST_MARK={mark}".encode() in (entry / "environ").read_bytes().split(
                b"\0"
            ):
                if "State:\tZ" not in (entry / "status").read_text():
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_a_killed_tile_run_leaves_no_worker_and_no_partial_file_and_a_bad_image_is_one_line(big_sample, tmp_path):
    out = tmp_path / "tiles"
    run = _run_tiles(big_sample, out, "--workers", "2")
    deadline = time.monotonic() + 240
    while not list(out.glob("tiles-*.tfrec")) and time.monotonic() < deadline:
        assert run.poll() is None, run.communicate()[1][-2000:]
        time.sleep(0.05)
    workers = [pid for pid in _marked(str(out)) if pid != run.pid]
    assert len(workers) >= 3, "expected the fork server and two workers"  # the fork server and its workers
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    deadline = time.monotonic() + 30
    while _marked(str(out)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _marked(str(out)) == [], "worker processes outlived the killed run"
    for path in out.glob("tiles-*.tfrec"):  # every file under its final name is whole and has its sidecar
        assert path.with_name(path.name + ".json").is_file()
        assert sum(1 for _ in tf.data.TFRecordDataset(str(path))) > 0
    # a bad image, cut in a worker, is one line naming it, exit 2
    bad = tmp_path / "bad"
    subprocess.run(["cp", "-r", str(big_sample), str(bad)], check=True)
    victim = sorted((bad / "train").glob("*_green.png"))[5]
    victim.write_bytes(b"not a png")
    done = _run_tiles(bad, tmp_path / "bad_tiles", "--workers", "2")
    _, err = done.communicate(timeout=300)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1 and victim.name.split("_")[0] in errors[0], err[-2000:]
    assert "Traceback" not in err


PAGE_FAULTS = """
import resource, sys
import numpy as np
from hpa_nb.core import workers
kept = workers.keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(4):  # an image's worth of planes, made and freed four times
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    planes = [np.ones((2048, 2048), np.float32) for _ in range(4)]
    del planes
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, *faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_memory_spares_the_next_image_its_page_faults():
    """What `keep_freed_memory` is for: after the first image, the same arrays again cost no fresh pages, where
    glibc's default maps and faults in every 16 MiB plane anew (about 2,000 faults for the four here, with the
    kernel's transparent huge pages; 16,384 without them)."""
    results = {}
    for mode in ("keep", "default"):
        printed = subprocess.run(
            [sys.executable, "-c", PAGE_FAULTS, mode], capture_output=True, text=True, cwd=REPO, timeout=120, check=True
        ).stdout.split()
        results[mode] = (printed[0], [int(count) for count in printed[1:]])
    kept, faults = results["keep"]
    first = faults[0]
    assert kept == "True" and first >= 1000 and max(faults[1:]) < first / 20, faults
    _, faults = results["default"]
    assert min(faults[1:]) >= first / 2, faults  # every plane faulted in again
