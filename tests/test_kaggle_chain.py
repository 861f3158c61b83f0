"""The Kaggle kernels as one chain, run as Kaggle runs them.

Each committed bundle runs with papermill in its own empty working folder under a simulated Kaggle root
(``HPA_KAGGLE_ROOT``), with ``KAGGLE_KERNEL_RUN_TYPE=Batch``, the repository off ``sys.path``, and the
earlier kernels' outputs mounted read-only under the input root: one at the classic depth
(``input/<slug>``), one nested (``input/notebooks/<owner>/<slug>``). The competition moves from the nested
mount to the classic one after training, so the next kernels must find it again. The training kernels run
in the venv of Kaggle's TPU image on 8 JAX devices; the others in this venv (Kaggle's CPU image has what it
lacks). Read-only is a bind mount in a user namespace; and the input tree must hash the same after every
kernel.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
from conftest import xla_flags

from hpa_nb.core.env import COMPETITION
from hpa_nb.data import shards, tiles
from hpa_nb.training import run
from hpa_nb.training.predictions import read_predictions

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "build" / "kaggle"
TPU_KERNELS = ("03_train", "07_cell_train")
READ_ONLY = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'

pytestmark = pytest.mark.slow


def _can_mount_read_only(folder: Path) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    probe = [
        "unshare",
        "-rm",
        "sh",
        "-c",
        READ_ONLY + " 2>/dev/null",
        "sh",
        str(folder),
        "sh",
        "-c",
        f'! touch "{folder}/probe" 2>/dev/null',
    ]
    try:
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


class KaggleSession:
    """A simulated /kaggle: `input/` (read-only to the kernels) and a `working/` emptied before each kernel."""

    def __init__(self, root: Path, tpu_python: Path) -> None:
        self.root, self.tpu_python = root, tpu_python
        self.input, self.working = root / "kaggle" / "input", root / "kaggle" / "working"
        self.input.mkdir(parents=True)
        self.read_only = _can_mount_read_only(self.input)
        if not self.read_only and os.environ.get("CI"):  # CI proves the inputs stay read-only; elsewhere, say it
            raise AssertionError(
                "unshare -rm is refused here, so /kaggle/input cannot be mounted read-only: CI needs it"
            )
        if not self.read_only:
            warnings.warn("unshare -rm is refused here: the chain ran with its inputs writable", stacklevel=2)
        self.outputs: dict[str, Path] = {}

    def mount(self, source: Path, at: str) -> Path:
        target = self.input / at
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
        return target

    def unmount(self, at: str) -> None:
        shutil.rmtree(self.input / at)

    def run(self, name: str, *parameters: str, fails: bool = False) -> str:
        """Run the committed bundle `name` as a Kaggle version; keep its output; return what it printed.
        With `fails`, the version must stop with an error instead."""
        shutil.rmtree(self.working, ignore_errors=True)
        self.working.mkdir()
        python = self.tpu_python if name in TPU_KERNELS else Path(sys.executable)
        environ = {
            key: value
            for key, value in os.environ.items()
            if key not in ("PYTHONPATH", "KERAS_BACKEND", "HPA_OUT", "HPA_DATA_DIR", "HPA_CPU_REPLICAS")
            and not key.startswith("KAGGLE_")
        }
        environ.update(
            KAGGLE_KERNEL_RUN_TYPE="Batch", HPA_KAGGLE_ROOT=str(self.root / "kaggle"), TF_CPP_MIN_LOG_LEVEL="2"
        )
        if name in TPU_KERNELS:
            environ.update(KERAS_BACKEND="jax", XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"))
        executed = self.root / "executed" / f"{name}.ipynb"
        executed.parent.mkdir(exist_ok=True)
        command = [
            str(python),
            "-m",
            "papermill",
            "--cwd",
            str(self.working),
            "-k",
            "python3",
            str(BUNDLES / name / f"{name}.ipynb"),
            str(executed),
            *parameters,
        ]
        if self.read_only:
            command = ["unshare", "-rm", "sh", "-c", READ_ONLY, "sh", str(self.input), *command]
        before = _tree_digest(self.input)
        done = subprocess.run(command, cwd=self.working, env=environ, capture_output=True, text=True, timeout=900)
        printed = _printed(executed) if executed.is_file() else ""
        assert (done.returncode != 0) is fails, (
            f"{name} exited {done.returncode}:\n{printed[-3000:]}\n{done.stderr[-3000:]}"
        )
        assert _tree_digest(self.input) == before, f"{name} changed its read-only input"
        self.outputs[name] = self.root / "outputs" / name
        shutil.rmtree(self.outputs[name], ignore_errors=True)
        shutil.copytree(self.working, self.outputs[name])
        return printed


def _printed(notebook: Path) -> str:
    texts = []
    for cell in json.loads(notebook.read_text())["cells"]:
        for output in cell.get("outputs", []):
            texts.append("".join(output.get("text", "")) + "".join(output.get("traceback", [])))
            texts.append("".join(output.get("data", {}).get("text/plain", "")))
    return "\n".join(texts)


def _trained(printed: str, output: Path) -> bool:
    """Whether a kernel trained a model of its own: it said so, Keras showed an epoch, or a run folder was left."""
    return (
        "training a quick" in printed
        or "Epoch 1/" in printed
        or any(path.name == "checkpoints" for path in output.rglob("*"))
    )


def test_the_kernels_hand_over_as_kaggle_mounts_them(small_sample, tpu_python, tmp_path):
    session = KaggleSession(tmp_path, tpu_python)
    competition = session.mount(small_sample, f"competitions/{COMPETITION}")  # nested, as Kaggle mounts it now
    (competition / "sample.json").unlink()  # the competition itself, not the synthetic sample a full run refuses
    quick = ("-p", "QUICK", "True")

    session.run("00_prepare", *quick)
    assert (session.outputs["00_prepare"] / shards.SHARD_DIR / shards.MANIFEST).is_file()
    session.mount(session.outputs["00_prepare"], "hpa-00-prepare")  # the classic depth

    folds = ("-p", "FOLDS", "2")
    printed = session.run("03_train", *quick, *folds, "-p", "FOLD", "0", "-p", "EPOCHS", "2")
    assert "data: compact shards" in printed and "hpa-00-prepare" in printed  # found without SHARDS set
    assert "projection: training" in printed
    assert "hpa_nb sources" in printed and str(REPO) not in printed  # the embedded copy, not the repository
    assert "visualkeras is not installed" in printed and "versions: python 3.12" in printed  # the TPU image's set
    first_run = session.outputs["03_train"] / run.FOLDER
    info = run.load_info(first_run)
    assert (info["backend"], info["replicas"], info["distribution"], info["epochs_run"]) == (
        "jax",
        8,
        "DataParallel",
        2,
    )
    assert info["data_source"]["kind"] == "competition" and (first_run / "model_diagram.png").is_file()
    session.mount(session.outputs["03_train"], "notebooks/alice/hpa-03-train")  # nested
    first_split, first_history = run.RunFolder(first_run).split.read_text(), run.load_history(first_run)
    first_size = run.load_config(first_run).data.image_size

    # the next version goes on from the first one's output, attached as its input (`push --resume-from`)
    printed = session.run(
        "03_train", *quick, *folds, "-p", "FOLD", "0", "-p", "EPOCHS", "3", "-p", "RESUME_FROM", "alice/hpa-03-train"
    )
    assert "continuing after epoch 2" in printed
    resumed = session.outputs["03_train"] / run.FOLDER
    assert run.load_history(resumed)["epoch"].tolist() == [0, 1, 2] and run.RunFolder(resumed).model.is_file()
    pd.testing.assert_frame_equal(run.load_history(resumed).iloc[:2], first_history)  # the attached epochs kept
    assert (
        run.RunFolder(resumed).split.read_text() == first_split
        and run.load_config(resumed).data.image_size == first_size
    )
    fold0 = session.mount(session.outputs["03_train"], "notebooks/alice/hpa-03-train") / run.FOLDER  # the newest
    # the other fold, a kernel of its own (`kaggle push 03_train --fold 1 --folds 2`), attached beside the first
    session.run("03_train", *quick, *folds, "-p", "FOLD", "1", "-p", "EPOCHS", "2")
    fold1 = session.mount(session.outputs["03_train"], "hpa-03-train-fold-1") / run.FOLDER
    held = [run.load_split(folder)["val"] for folder in (fold0, fold1)]
    assert sorted(held[0] + held[1]) == sorted(pd.read_csv(small_sample / "train.csv", dtype=str)["ID"])
    for folder, ids in zip((fold0, fold1), held):  # written under DataParallel over 8 devices, padded batches
        assert read_predictions(run.RunFolder(folder).oof)[0] == ids
    # the competition is mounted elsewhere from now on: the next kernels must find it again
    session.unmount(f"competitions/{COMPETITION}")
    session.mount(small_sample, COMPETITION)
    (session.input / COMPETITION / "sample.json").unlink()

    printed = session.run("04_evaluate")
    assert "notebooks/alice/hpa-03-train/run" in printed and not _trained(printed, session.outputs["04_evaluate"])
    assert (session.outputs["04_evaluate"] / "04_evaluate" / "metrics.json").is_file()
    assert (session.outputs["04_evaluate"] / "04_evaluate" / "class_maps.png").is_file()

    # the cell kernel pushed before 06_cells' output is attached: one line naming it, before any work
    stopped = session.run("07_cell_train", *quick, fails=True)
    assert "MissingInputError" in stopped and "no cell tiles attached under" in stopped
    assert "python -m hpa_nb kaggle push 07_cell_train (it attaches OWNER/hpa-06-cells)" in stopped
    assert [path.name for path in session.outputs["07_cell_train"].iterdir()] == ["hpa_nb_src"]  # the bootstrap's only

    session.run("06_cells", *quick)
    assert (session.outputs["06_cells"] / tiles.TILE_DIR / tiles.MANIFEST).is_file()
    session.mount(session.outputs["06_cells"], "hpa-06-cells")

    image_only = session.run("05_submission")
    assert "an ensemble of 2 image runs" in image_only and "hpa-03-train-fold-1/run" in image_only
    assert "under the image model's rule" in image_only and not _trained(image_only, session.outputs["05_submission"])
    first = pd.read_csv(session.outputs["05_submission"] / "submission.csv", keep_default_na=False)

    printed = session.run("07_cell_train", *quick, "-p", "EPOCHS", "2")
    assert "hpa-06-cells/tiles" in printed and "cell tiles" in printed
    assert run.RunFolder(session.outputs["07_cell_train"] / run.CELL_FOLDER).model.is_file()
    session.mount(session.outputs["07_cell_train"], "notebooks/alice/hpa-07-cell-train")

    both = session.run("05_submission")
    assert "notebooks/alice/hpa-07-cell-train/cell_run" in both and "under the image × cell rule" in both
    assert not _trained(both, session.outputs["05_submission"])
    second = pd.read_csv(session.outputs["05_submission"] / "submission.csv", keep_default_na=False)
    test_ids = pd.read_csv(small_sample / "sample_submission.csv", dtype=str)["ID"].tolist()
    assert first["ID"].tolist() == second["ID"].tolist() == test_ids
    assert (second["PredictionString"] != "").all()
    assert not first["PredictionString"].equals(second["PredictionString"])  # the cell run changed the scores
