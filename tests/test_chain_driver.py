"""`kaggle chain`: the driver over the kernels' graph, against a stand-in `kaggle` command on PATH
(tests/standins/kaggle_service.py) that keeps kernels, versions, states, outputs and logs in a folder and prints
what kaggle-cli 2.2 prints. No network: every call the driver makes goes through that command."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_kaggle import write_notebooks

from hpa_nb import cli
from hpa_nb.core import chain as table
from hpa_nb.core.env import COMPETITION
from hpa_nb.data import shards, tiles
from hpa_nb.kaggle import chain
from hpa_nb.training import run

REPO = Path(__file__).resolve().parents[1]
SERVICE = REPO / "tests" / "standins" / "kaggle_service.py"
# Each kernel's output when its work is finished, under the names their owning modules give them.
FINISHED = {
    "hpa-00-prepare": {f"{shards.SHARD_DIR}/{shards.MANIFEST}": {"complete": True}},
    "hpa-06-cells": {f"{tiles.TILE_DIR}/{tiles.MANIFEST}": {"complete": True}},
    "hpa-03-train": {f"{run.FOLDER}/{run.CONFIG_FILE}": {"stopped_at_deadline": False}},
    "hpa-07-cell-train": {f"{run.CELL_FOLDER}/{run.CONFIG_FILE}": {"stopped_at_deadline": False}},
    "hpa-05-submission": {"submission.csv": "ID,ImageWidth,ImageHeight,PredictionString\n"},
}
ENDS = ["QUEUED", "RUNNING", "COMPLETE"]


def finished(slug: str, **changes) -> dict:
    base = slug if slug in FINISHED else "hpa-03-train"  # the fold kernels write a run like 03_train
    return {"states": ENDS, "outputs": FINISHED[base], "log": ["starting", "done"], **changes}


@pytest.fixture()
def service(tmp_path, monkeypatch):
    """The stand-in kaggle on PATH for user alice; returns (state folder, write_script)."""
    state, bin_dir = tmp_path / "kaggle-state", tmp_path / "bin"
    state.mkdir()
    bin_dir.mkdir()
    (bin_dir / "kaggle").write_text(f'#!/bin/sh\nexec {sys.executable} {SERVICE} "$@"\n')
    (bin_dir / "kaggle").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_KAGGLE_STATE", str(state))
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setattr(chain, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(chain.kaggle, "PUSH_DIR", tmp_path / "push")
    kernels = {slug: [finished(slug)] for slug in [*FINISHED, *(f"hpa-03-train-fold-{k}" for k in range(3))]}

    def script(submit: str = "ok", **versions) -> None:
        (state / "script.json").write_text(json.dumps({"kernels": {**kernels, **versions}, "submit": submit}))

    script()
    return state, script


@pytest.fixture(scope="module")
def notebooks(tmp_path_factory) -> Path:
    return write_notebooks(tmp_path_factory.mktemp("chain_notebooks"))


def drive(
    notebooks: Path, folds: int | None = None, wait: bool = True, sessions: int = 1, machine: str | None = None
) -> str:
    out = io.StringIO()
    chain.drive(
        chain.steps(folds, machine),
        chain.Kaggle("alice"),
        wait=wait,
        sessions=sessions,
        poll=0,
        out=out,
        notebooks_dir=notebooks,
        sleep=lambda seconds: None,
    )
    return out.getvalue()


def pushes(state: Path) -> list[dict]:
    log = state / "pushes.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def test_a_fresh_chain_runs_to_the_end_in_graph_order_with_exactly_its_rows_sources(service, notebooks):
    state, _ = service
    printed = drive(notebooks)
    order = [push["slug"] for push in pushes(state)]
    assert sorted(order[:2]) == ["hpa-00-prepare", "hpa-06-cells"]  # side by side, first
    assert order[2:] == ["hpa-03-train", "hpa-07-cell-train", "hpa-05-submission"]
    sources = {push["slug"]: push["metadata"]["kernel_sources"] for push in pushes(state)}
    assert sources == {
        "hpa-00-prepare": [],
        "hpa-06-cells": [],
        "hpa-03-train": ["alice/hpa-00-prepare"],
        "hpa-07-cell-train": ["alice/hpa-06-cells", "alice/hpa-03-train"],
        "hpa-05-submission": ["alice/hpa-03-train", "alice/hpa-07-cell-train"],
    }
    bundle = json.loads((chain.kaggle.PUSH_DIR / "03_train" / "03_train.ipynb").read_text())
    assert "SHARDS = 'alice/hpa-00-prepare'" in "".join("".join(cell["source"]) for cell in bundle["cells"])
    assert "pushed 05_submission (alice/hpa-05-submission, version 1)" in printed
    last_table = printed.split("\nkernel ")[-1].splitlines()[1:]
    assert [row.split()[-1] for row in last_table] == ["done"] * 5 and all(" v1 " in row for row in last_table)
    calls = [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]
    asked = [(call[1], call[2].split("/")[1]) for call in calls if call[:1] == ["kernels"] and call[1] != "push"]
    for slug in ("hpa-00-prepare", "hpa-05-submission"):  # asked until done (one pass: status, output, logs), no more
        assert [what for what, about in asked if about == slug][-3:] == ["status", "output", "logs"]
        assert [what for what, about in asked if about == slug].count("output") == 1


def test_running_it_again_midway_pushes_nothing_twice(service, notebooks):
    state, _ = service
    drive(notebooks, wait=False)  # 00 and 06 pushed, 03 waits for 00
    assert sorted(push["slug"] for push in pushes(state)) == ["hpa-00-prepare", "hpa-06-cells"]
    for _ in range(2):  # 00 and 06 are queued, then running: nothing new is ready
        drive(notebooks, wait=False)
        assert len(pushes(state)) == 2
    drive(notebooks, wait=False)  # 00 and 06 complete now: 03 is pushed, once
    drive(notebooks, wait=False)
    assert [push["slug"] for push in pushes(state)][2:] == ["hpa-03-train"]


def test_a_version_stopped_at_hours_is_resumed_with_resume_from(service, notebooks):
    state, script = service
    stopped = {
        "states": ["QUEUED", "RUNNING", "ERROR"],
        "failure": "tiles stopped at HOURS with 9000 images",
        "outputs": {"tiles/tiles.json": {"complete": False}},
        "log": ["tiles: stopping at the deadline"],
    }
    script(**{"hpa-06-cells": [stopped, finished("hpa-06-cells")]})
    drive(notebooks)
    cells = [push for push in pushes(state) if push["slug"] == "hpa-06-cells"]
    assert [push["version"] for push in cells] == [1, 2]
    assert cells[0]["metadata"]["kernel_sources"] == []
    assert cells[1]["metadata"]["kernel_sources"] == ["alice/hpa-06-cells"]  # its own output, to go on from
    notebook = json.loads((chain.kaggle.PUSH_DIR / "06_cells" / "06_cells.ipynb").read_text())
    assert "RESUME_FROM = 'alice/hpa-06-cells'" in "".join("".join(cell["source"]) for cell in notebook["cells"])
    assert [push["slug"] for push in pushes(state)][-1] == "hpa-05-submission"  # and the chain went on


def test_a_version_ending_in_error_stops_the_driver_in_one_line_with_the_failure(
    service, notebooks, capsys, monkeypatch
):
    state, script = service
    crashed = {
        "states": ["QUEUED", "RUNNING", "ERROR"],
        "failure": "Your notebook tried to allocate more memory",
        "log": ["epoch 3/20", "Traceback (most recent call last):", "MemoryError: out of HBM"],
    }
    script(**{"hpa-07-cell-train": [crashed]})
    monkeypatch.setattr(chain.kaggle, "NOTEBOOKS_DIR", notebooks)
    monkeypatch.setattr(chain.Kaggle, "push", _pushing_from(notebooks))
    assert cli.main(["kaggle", "chain", "run", "--wait", "--poll", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err.split(";")[0]
    assert err.startswith("error: 07_cell_train (hpa-07-cell-train, version 1) ended in error")
    assert "Your notebook tried to allocate more memory" in err and "MemoryError: out of HBM" in err
    assert "hpa-05-submission" not in [push["slug"] for push in pushes(state)]


def test_two_tpu_kernels_ready_together_are_pushed_one_after_the_other(service, notebooks):
    state, _ = service
    drive(notebooks, folds=2)
    tpu = [push for push in pushes(state) if push["metadata"]["enable_tpu"]]
    assert [push["slug"] for push in tpu] == ["hpa-03-train-fold-0", "hpa-03-train-fold-1", "hpa-07-cell-train"]
    assert all(push["active_of_its_kind"] == [] for push in tpu)  # never a second TPU session beside the first
    sources = {push["slug"]: push["metadata"]["kernel_sources"] for push in pushes(state)}
    assert sources["hpa-07-cell-train"] == ["alice/hpa-06-cells", "alice/hpa-03-train-fold-0"]
    assert sources["hpa-05-submission"] == [
        "alice/hpa-03-train-fold-0",
        "alice/hpa-03-train-fold-1",
        "alice/hpa-07-cell-train",
    ]


def test_the_training_kernels_run_on_a_gpu_machine_one_session_at_a_time(service, notebooks):
    state, _ = service
    drive(notebooks, folds=2, machine="NvidiaTeslaT4Highmem")
    shapes = {push["slug"]: push["metadata"].get("machine_shape") for push in pushes(state)}
    assert shapes == {
        "hpa-00-prepare": None,
        "hpa-06-cells": None,
        "hpa-03-train-fold-0": "NvidiaTeslaT4Highmem",
        "hpa-03-train-fold-1": "NvidiaTeslaT4Highmem",
        "hpa-07-cell-train": "NvidiaTeslaT4Highmem",
        "hpa-05-submission": None,
    }
    gpu = [push for push in pushes(state) if push["metadata"]["enable_gpu"]]
    assert len(gpu) == 3 and not any(push["metadata"]["enable_tpu"] for push in pushes(state))
    assert all(push["active_of_its_kind"] == [] for push in gpu)


def test_a_setting_lets_two_tpu_kernels_run_at_once(service, notebooks):
    state, _ = service
    for _ in range(4):  # pushed, queued, running, complete: then 00 is done and both folds go at once
        drive(notebooks, folds=2, wait=False, sessions=2)
    folds = [push for push in pushes(state) if push["slug"].startswith("hpa-03-train-fold")]
    assert [push["slug"] for push in folds] == ["hpa-03-train-fold-0", "hpa-03-train-fold-1"]
    assert folds[1]["active_of_its_kind"] == ["hpa-03-train-fold-0"]


@pytest.mark.parametrize("answer", ["403", "ok"])
def test_submit_refused_with_a_403_ends_with_the_browser_instructions(service, notebooks, capsys, monkeypatch, answer):
    state, script = service
    script(submit=answer)
    monkeypatch.setattr(chain.Kaggle, "push", _pushing_from(notebooks))
    code = cli.main(["kaggle", "chain", "run", "--wait", "--submit", "--poll", "0"])
    out, err = capsys.readouterr()
    submitted = [json.loads(line) for line in (state / "submissions.jsonl").read_text().splitlines()]
    assert submitted == [
        [
            "competitions",
            "submit",
            "-c",
            COMPETITION,
            "-k",
            "alice/hpa-05-submission",
            "-v",
            "1",
            "-f",
            "submission.csv",
            "-m",
            "hpa-nb chain",
        ]
    ]
    if answer == "403":
        assert code == 2 and err.count("\n") == 1
        assert "refused the code submission" in err and "403" in err
        assert "https://www.kaggle.com/code/alice/hpa-05-submission" in err
    else:
        assert code == 0 and "submitted alice/hpa-05-submission version 1" in out


def test_status_reads_kaggle_and_plan_takes_a_versions_own_projection(service, notebooks, capsys):
    _, script = service
    projected = finished(
        "hpa-06-cells",
        log=[
            "projection: tiles of /kaggle/input/x, 0.4 s and 500 kB per image "
            "measured here, so the 21,806 images take 2.4 h in all"
        ],
    )
    script(**{"hpa-06-cells": [projected]})
    drive(notebooks, wait=False)
    assert cli.main(["kaggle", "chain", "status"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "queued" in rows["06_cells"] and "v1" in rows["06_cells"] and "wait" in rows["06_cells"]
    assert "not pushed" in rows["03_train"] and "after 00_prepare" in rows["03_train"]
    assert cli.main(["kaggle", "chain", "plan"]) == 0
    plan = capsys.readouterr().out
    assert "2.4 h  projected by version 1" in plan  # 06's own line, not the README's 6.0 h
    # 00 (1.8 h) → 03 (2.5) → 07 (6.5) → 05 (0.1) is longer than 06 (2.4) → 07 → 05
    assert "critical path: 00_prepare → 03_train → 07_cell_train → 05_submission: 10.9 h wall clock" in plan


def test_plan_on_a_fresh_clone_needs_no_kaggle_and_shows_the_graph(tmp_path):
    environ = {key: value for key, value in os.environ.items() if not key.startswith("KAGGLE_")}
    environ.update(HOME=str(tmp_path), PYTHONPATH=str(REPO), PATH=f"{tmp_path}{os.pathsep}{environ['PATH']}")
    (tmp_path / "kaggle").write_text("#!/bin/sh\necho 'No Kaggle credentials found' >&2\nexit 1\n")  # no account here
    (tmp_path / "kaggle").chmod(0o755)
    done = subprocess.run(
        [sys.executable, "-m", "hpa_nb", "kaggle", "chain", "plan", "--folds", "2"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert (
        "side by side: 00_prepare ∥ 06_cells, then 03_train fold 0 ∥ 03_train fold 1, then 07_cell_train, "
        "then 05_submission" in done.stdout
    )
    assert "TPU this week: 11.5 h of the free 20 h" in done.stdout
    assert "docs, measured" in done.stdout and "Kaggle not asked" in done.stdout


def test_the_chain_table_names_the_markers_their_owners_write():
    assert table.KERNELS["00_prepare"].done_marker == f"{shards.SHARD_DIR}/{shards.MANIFEST}"
    assert table.KERNELS["06_cells"].done_marker == f"{tiles.TILE_DIR}/{tiles.MANIFEST}"
    assert table.KERNELS["03_train"].done_marker == f"{run.FOLDER}/{run.CONFIG_FILE}"
    assert table.KERNELS["07_cell_train"].done_marker == f"{run.CELL_FOLDER}/{run.CONFIG_FILE}"
    assert [wave for wave in chain.waves(chain.steps())] == [
        [chain.Step("00_prepare"), chain.Step("06_cells")],
        [chain.Step("03_train")],
        [chain.Step("07_cell_train")],
        [chain.Step("05_submission")],
    ]


def _pushing_from(notebooks: Path):
    """`Kaggle.push` with the stand-in notebooks, for the tests that go through the command line."""
    original = chain.Kaggle.push

    def push(self, step, steps, resume, push_dir=None, notebooks_dir=None):
        return original(self, step, steps, resume, push_dir, notebooks)

    return push
