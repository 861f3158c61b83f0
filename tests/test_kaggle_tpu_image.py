"""The committed training kernel on Kaggle's TPU image: its Python 3.12 package set, JAX over 8 devices, no repo.

`requirements-kaggle-tpu.txt` lists what that image holds (no plotly, kaleido, visualkeras,
scikit-image or pycocotools). `.ci/kaggle-tpu-venv` builds a venv of exactly that (cached by
the file's hash; `make test` passes its path as HPA_TPU_VENV), and the committed bundle
`build/kaggle/03_train/03_train.ipynb` runs there with papermill as Kaggle runs it: from a
clean folder, the repository off sys.path, 8 virtual JAX devices standing in for the 8 chips.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "build" / "kaggle" / "03_train" / "03_train.ipynb"
SHARED_IMAGE_LIST = REPO.parent / "shared" / "kaggle" / "tpu-image.txt"
MISSING_ON_THE_IMAGE = ("plotly", "kaleido", "visualkeras", "skimage", "pycocotools")

pytestmark = pytest.mark.slow


def test_the_image_list_is_the_shared_one():
    if SHARED_IMAGE_LIST.is_file():  # beside a checkout of the project; a plain clone has only ours
        assert (REPO / "requirements-kaggle-tpu.txt").read_text() == SHARED_IMAGE_LIST.read_text()


def test_the_venv_is_python_312_without_the_packages_the_image_lacks(tpu_python):
    probe = ("import importlib.util, sys; print(sys.version_info[:2] == (3, 12), "
             f"[name for name in {MISSING_ON_THE_IMAGE!r} if importlib.util.find_spec(name)])")
    done = subprocess.run([str(tpu_python), "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.split(None, 1) == ["True", "[]\n"], done.stdout + done.stderr


def _papermill(tpu_python: Path, workdir: Path, out: Path, data: Path, *parameters: str,
               **environ: str) -> subprocess.CompletedProcess:
    clean = {key: value for key, value in os.environ.items()
             if key not in ("PYTHONPATH", "KERAS_BACKEND", "HPA_CPU_REPLICAS") and not key.startswith("KAGGLE_")}
    clean.update(KERAS_BACKEND="jax", XLA_FLAGS="--xla_force_host_platform_device_count=8", HPA_OUT=str(out),
                 HPA_DATA_DIR=str(data), TF_CPP_MIN_LOG_LEVEL="2", **environ)
    workdir.mkdir(parents=True, exist_ok=True)
    command = [str(tpu_python), "-m", "papermill", "--cwd", str(workdir), "-k", "python3", str(BUNDLE),
               str(workdir / "executed.ipynb"), *parameters]
    return subprocess.run(command, cwd=workdir, env=clean, capture_output=True, text=True, timeout=1200)


def _outputs(workdir: Path) -> str:
    notebook = json.loads((workdir / "executed.ipynb").read_text())
    texts = []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            texts.append("".join(output.get("text", "")) + "".join(output.get("traceback", [])))
            texts.append("".join(output.get("data", {}).get("text/plain", "")))
    return "\n".join(texts)


def test_the_training_bundle_trains_and_resumes_on_eight_jax_devices(tpu_python, small_sample, tmp_path):
    first = _papermill(tpu_python, tmp_path / "first", tmp_path / "out", small_sample, "-p", "QUICK", "True",
                       "-p", "IMAGE_SIZE", "32", "-p", "EPOCHS", "2")
    assert first.returncode == 0, first.stderr[-4000:]
    run = tmp_path / "out" / "run"
    info = json.loads((run / "config.json").read_text())
    assert (info["backend"], info["replicas"], info["distribution"], info["epochs_run"]) == ("jax", 8, "DataParallel", 2)
    assert (run / "model.keras").is_file() and (run / "model_diagram.png").is_file()
    printed = _outputs(tmp_path / "first")
    assert "hpa_nb sources" in printed and str(REPO) not in printed  # the embedded copy, not the repository
    assert "visualkeras is not installed" in printed and "versions: python 3.12" in printed

    # The next session goes on from the first one's output, and reads compact shards written elsewhere
    # (as 00_prepare's output is attached on Kaggle), paired with the data's train.csv.
    from hpa_nb.shards import write_shards

    shard_dir = tmp_path / "prepared" / "shards"
    write_shards(small_sample, shard_dir, size=32, channels="rgb", encoding="png", progress=False)
    resumed = _papermill(tpu_python, tmp_path / "second", tmp_path / "out2", small_sample, "-p", "QUICK", "True",
                         "-p", "IMAGE_SIZE", "32", "-p", "EPOCHS", "3", "-p", "RESUME_FROM", str(run),
                         "-p", "SHARDS", str(shard_dir))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    printed = _outputs(tmp_path / "second")
    assert "continuing after epoch 2" in printed
    assert f"data: compact shards {shard_dir} (40 images, 32 px, rgb, png) with labels checked against" in printed
    history = (tmp_path / "out2" / "run" / "history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["0", "1", "2"]


def test_a_full_run_on_kaggle_with_the_sample_stops_before_training(tpu_python, small_sample, tmp_path):
    refused = _papermill(tpu_python, tmp_path / "nb", tmp_path / "out", small_sample,
                         KAGGLE_KERNEL_RUN_TYPE="Batch")
    assert refused.returncode != 0
    printed = _outputs(tmp_path / "nb")
    assert "PreflightError" in printed and "competition data is not attached" in printed
    assert not (tmp_path / "out" / "run" / "checkpoints").exists()
