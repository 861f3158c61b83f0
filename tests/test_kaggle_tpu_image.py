"""The committed training kernel on Kaggle's TPU image: its Python 3.12 package set, JAX over 8 devices, no repo.

`requirements-kaggle-tpu.txt` lists what that image holds (no plotly, kaleido, visualkeras,
scikit-image or pycocotools). `.ci/kaggle-tpu-venv` builds a venv of exactly that (cached by
the file's hash; `make test` passes its path as HPA_TPU_VENV), and the committed bundle
`build/kaggle/03_train/03_train.ipynb` runs there with papermill as Kaggle runs it: from a
clean folder, the repository off sys.path, 8 virtual JAX devices standing in for the 8 chips. Here it must
refuse a full run on the sample; its training, and a second version resuming from the first one's attached
output, run in the Kaggle chain (`tests/test_kaggle_chain.py`), which trains the TPU kernels in this venv.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from hpa_nb.training.run import RunFolder

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


def test_every_stage_and_the_cli_import_on_the_image(tpu_python, tmp_path):
    """What the image lacks is imported only where it is used: every module of the package loads there (the CLI
    included, `python -m hpa_nb train` on a TPU VM), and none of the missing packages is asked for."""
    probe = ("import importlib, pkgutil, sys, hpa_nb\n"
             "names = [m.name for m in pkgutil.walk_packages(hpa_nb.__path__, 'hpa_nb.') if m.name != 'hpa_nb.__main__']\n"
             "for name in names: importlib.import_module(name)\n"
             f"print(len(names), [name for name in {MISSING_ON_THE_IMAGE!r} if name in sys.modules])")
    environ = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "KERAS_BACKEND")}
    done = subprocess.run([str(tpu_python), "-c", probe], cwd=tmp_path, env={**environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    count, missing = done.stdout.strip().splitlines()[-1].split(" ", 1)
    assert int(count) >= 40 and missing == "[]", done.stdout


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


def test_a_full_run_on_kaggle_with_the_sample_stops_before_training(tpu_python, small_sample, tmp_path):
    refused = _papermill(tpu_python, tmp_path / "nb", tmp_path / "out", small_sample,
                         KAGGLE_KERNEL_RUN_TYPE="Batch")
    assert refused.returncode != 0
    printed = _outputs(tmp_path / "nb")
    assert "PreflightError" in printed and "competition data is not attached" in printed
    assert not RunFolder(tmp_path / "out" / "run").checkpoints.exists()
