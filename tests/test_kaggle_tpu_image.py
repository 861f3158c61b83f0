"""The committed training kernel on Kaggle's TPU image: its Python 3.12 package sets, JAX over 8 devices, no repo.

The image's recipe leaves keras, jax and numpy unpinned, so what it holds floats. Two resolutions of it are kept:
`requirements-kaggle-tpu.txt` (August 2026) and `requirements-kaggle-tpu-2026-12.txt` (2026-12-05: jax 0.12,
keras-hub 0.32, numpy 2.5.5, pandas 3.1, pillow 13). Neither holds plotly, kaleido, visualkeras, scikit-image or
pycocotools. `.ci/kaggle-tpu-venv` builds a venv of exactly one (cached by the file's hash; `make test` passes their
paths as HPA_TPU_VENV and HPA_TPU_VENV_2026_12), and the committed bundle `build/kaggle/03_train/03_train.ipynb` runs
there with papermill as Kaggle runs it: from a clean folder, the repository off sys.path, 8 virtual JAX devices
standing in for the 8 chips. In each set it must refuse a full run on the sample, and a TPU VM whose JAX sees no
TPU. It trains here in today's set; in the August set it trains, and a second version resumes from the first one's
attached output, in the Kaggle chain (`tests/test_kaggle_chain.py`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import TPU_PACKAGE_SETS, tpu_venv_python, xla_flags

from hpa_nb.training import run
from hpa_nb.training.run import RunFolder

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "build" / "kaggle" / "03_train" / "03_train.ipynb"
SHARED_IMAGE_LISTS = {
    "2026-08": REPO.parent / "shared" / "kaggle" / "tpu-image.txt",
    "2026-12": REPO.parent / "shared" / "kaggle" / "tpu-image-2026-12.txt",
}
MISSING_ON_THE_IMAGE = ("plotly", "kaleido", "visualkeras", "skimage", "pycocotools", "wandb")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=sorted(TPU_PACKAGE_SETS))
def tpu_set(request) -> tuple[str, Path]:
    """(package set, its venv's interpreter), for each set of Kaggle's TPU image."""
    return request.param, tpu_venv_python(request.param)


@pytest.mark.parametrize("package_set", sorted(TPU_PACKAGE_SETS))
def test_each_image_list_is_the_shared_one_with_its_source_and_date(package_set):
    ours = (REPO / TPU_PACKAGE_SETS[package_set][0]).read_text()
    assert "# Source: Kaggle/docker-python" in ours and re.search(r"resolved .*20\d\d-\d\d-\d\d", ours, re.S)
    if SHARED_IMAGE_LISTS[package_set].is_file():  # beside a checkout of the project; a plain clone has only ours
        assert ours == SHARED_IMAGE_LISTS[package_set].read_text()


def test_the_venv_is_python_312_without_the_packages_the_image_lacks(tpu_set):
    _, tpu_python = tpu_set
    probe = (
        "import importlib.util, sys; print(sys.version_info[:2] == (3, 12), "
        f"[name for name in {MISSING_ON_THE_IMAGE!r} if importlib.util.find_spec(name)])"
    )
    done = subprocess.run([str(tpu_python), "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.split(None, 1) == ["True", "[]\n"], done.stdout + done.stderr


def test_every_stage_and_the_cli_import_on_the_image(tpu_set, tmp_path):
    """What the image lacks is imported only where it is used: every module of the package loads there (the CLI
    included, `python -m hpa_nb train` on a TPU VM), and none of the missing packages is asked for."""
    _, tpu_python = tpu_set
    probe = (
        "import importlib, pkgutil, sys, hpa_nb\n"
        "names = [m.name for m in pkgutil.walk_packages(hpa_nb.__path__, 'hpa_nb.') if m.name != 'hpa_nb.__main__']\n"
        "for name in names: importlib.import_module(name)\n"
        f"print(len(names), [name for name in {MISSING_ON_THE_IMAGE!r} if name in sys.modules])"
    )
    environ = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "KERAS_BACKEND")}
    done = subprocess.run(
        [str(tpu_python), "-c", probe],
        cwd=tmp_path,
        env={**environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    count, missing = done.stdout.strip().splitlines()[-1].split(" ", 1)
    assert int(count) >= 40 and missing == "[]", done.stdout


def _papermill(
    tpu_python: Path, workdir: Path, out: Path, data: Path, *parameters: str, **environ: str
) -> subprocess.CompletedProcess:
    clean = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "KERAS_BACKEND", "HPA_CPU_REPLICAS") and not key.startswith("KAGGLE_")
    }
    clean.update(
        KERAS_BACKEND="jax",
        XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"),
        HPA_OUT=str(out),
        HPA_DATA_DIR=str(data),
        TF_CPP_MIN_LOG_LEVEL="2",
        **environ,
    )
    workdir.mkdir(parents=True, exist_ok=True)
    command = [
        str(tpu_python),
        "-m",
        "papermill",
        "--cwd",
        str(workdir),
        "-k",
        "python3",
        str(BUNDLE),
        str(workdir / "executed.ipynb"),
        *parameters,
    ]
    return subprocess.run(command, cwd=workdir, env=clean, capture_output=True, text=True, timeout=1200)


def _outputs(workdir: Path) -> str:
    notebook = json.loads((workdir / "executed.ipynb").read_text())
    texts = []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            texts.append("".join(output.get("text", "")) + "".join(output.get("traceback", [])))
            texts.append("".join(output.get("data", {}).get("text/plain", "")))
    return "\n".join(texts)


# The refusals' logic is test_preflight's; here the bundle itself refuses in the image's packages, one refusal in
# each set: the sample in August's, a JAX without its TPU in December's, whose versions the line names.
def test_a_full_run_on_kaggle_with_the_sample_stops_before_training(tpu_python, small_sample, tmp_path):
    refused = _papermill(tpu_python, tmp_path / "nb", tmp_path / "out", small_sample, KAGGLE_KERNEL_RUN_TYPE="Batch")
    assert refused.returncode != 0
    printed = _outputs(tmp_path / "nb")
    assert "PreflightError" in printed and "competition data is not attached" in printed
    assert not RunFolder(tmp_path / "out" / "run").checkpoints.exists()


def test_a_tpu_vm_whose_jax_sees_no_tpu_stops_in_one_line_naming_the_versions(
    tpu_python_december, small_sample, tmp_path
):
    """A libtpu that does not suit the image's jax leaves JAX on the CPU: even a quick run stops before training."""
    package_set, tpu_python = "2026-12", tpu_python_december
    pins = dict(
        re.findall(r"^([a-z-]+)(?:\[cpu\])?==(\S+)$", (REPO / TPU_PACKAGE_SETS[package_set][0]).read_text(), flags=re.M)
    )
    refused = _papermill(
        tpu_python,
        tmp_path / "nb",
        tmp_path / "out",
        small_sample,
        "-p",
        "QUICK",
        "True",
        KAGGLE_KERNEL_RUN_TYPE="Batch",
        ISTPUVM="1",
    )
    assert refused.returncode != 0
    printed = _outputs(tmp_path / "nb")
    assert (
        f"JAX sees no TPU (cpu only) with jax {pins['jax']}, jaxlib {pins['jax']}, libtpu not installed" in printed
    ), printed[-2000:]
    assert not RunFolder(tmp_path / "out" / "run").checkpoints.exists()


def test_the_training_bundle_trains_over_8_devices_in_todays_set(small_sample, tmp_path):
    """The August set trains in the Kaggle chain; today's set trains here, the same bundle, 2 quick epochs."""
    tpu_python = tpu_venv_python("2026-12")
    done = _papermill(
        tpu_python, tmp_path / "nb", tmp_path / "out", small_sample, "-p", "QUICK", "True", "-p", "EPOCHS", "2"
    )
    printed = _outputs(tmp_path / "nb") if (tmp_path / "nb" / "executed.ipynb").is_file() else ""
    assert done.returncode == 0, printed[-3000:] + done.stderr[-3000:]
    info = run.load_info(tmp_path / "out" / "run")
    assert (info["backend"], info["replicas"], info["distribution"], info["epochs_run"]) == (
        "jax",
        8,
        "DataParallel",
        2,
    )
    assert "versions: python 3.12" in printed and "jax 0.12.0.1" in printed and "keras 3.15.1" in printed
    assert run.RunFolder(tmp_path / "out" / "run").oof.is_file()


@pytest.mark.parametrize("ci", [False, True])
def test_without_python_312_the_check_is_skipped_in_one_line_but_required_in_ci(tmp_path, ci):
    """No Python 3.12 can come from PyPI, so none is provided: a user's `make test` goes on without the TPU-image
    checks, said in one line (exit 3); CI stops (exit 1)."""
    environ = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **({"CI": "true"} if ci else {})}
    if any(Path(folder, "python3.12").exists() for folder in ("/usr/bin", "/bin", "/usr/local/bin")):  # its candidates
        pytest.skip("this machine has a system Python 3.12: nothing to simulate")
    done = subprocess.run(
        ["bash", str(REPO / ".ci" / "kaggle-tpu-venv")], env=environ, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout) == ((1 if ci else 3), "")
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: " if ci else "note: no Python 3.12 here")
    assert "HPA_PYTHON312" in done.stderr


PRESET_SCRIPT = """
import sys
import keras_hub
backbone = keras_hub.models.ResNetBackbone(
    input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 32], stackwise_num_blocks=[1, 1],
    stackwise_num_strides=[1, 2], block_type="basic_block", use_pre_activation=False, image_shape=(None, None, 3))
backbone.save_to_preset(sys.argv[1])
"""
CHECK_SCRIPT = """
import sys
import numpy as np
import hpa_nb, keras_hub
from hpa_nb.training.model import build_backbone
from hpa_nb.training.run import load_model
preset, run_dir = sys.argv[1], sys.argv[2]
source = keras_hub.models.Backbone.from_preset(preset)
built = build_backbone(preset, 32, "rgby", "imagenet")
stem = lambda model: next(w for w in model.weights if len(w.shape) == 4).numpy()
rgb, rgby = stem(source), stem(built)
print("stem", rgby.shape[2], np.allclose(rgby[:, :, :3], rgb), np.allclose(rgby[:, :, 3], rgb.mean(axis=2), atol=1e-6))
model = load_model(run_dir)
print("predict", model.predict_on_batch(np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 4))).shape)
"""
OFFLINE = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}


def test_a_kerashub_preset_folder_trains_and_predicts_offline_in_the_august_set(tpu_python, small_sample, tmp_path):
    """A small KerasHub backbone built from its config and written with `save_to_preset`, as a Kaggle Models version
    is attached: `train --backbone FOLDER` with 4 channels, the proxy a dead port, then the run's model predicts.
    In the August set, the one the chain trains in; the December set trains a family of each kind (test_kerashub)."""
    environ = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "KERAS_BACKEND")}
    environ.update(
        KERAS_BACKEND="jax", PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2", HPA_OUT=str(tmp_path), **OFFLINE
    )
    preset, run_dir = tmp_path / "preset", tmp_path / "run"
    made = subprocess.run(
        [str(tpu_python), "-c", PRESET_SCRIPT, str(preset)], env=environ, capture_output=True, text=True, timeout=300
    )
    assert made.returncode == 0 and (preset / "config.json").is_file(), made.stderr[-2000:]
    trained = subprocess.run(
        [
            str(tpu_python),
            "-m",
            "hpa_nb",
            "train",
            "--quick",
            "--backbone",
            str(preset),
            "--weights",
            "imagenet",
            "--channels",
            "rgby",
            "--data",
            str(small_sample),
            "--out",
            str(run_dir),
            "--image-size",
            "32",
            "--epochs",
            "1",
            "--steps-per-epoch",
            "2",
            "--batch-size",
            "4",
        ],
        env=environ,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert run.load_config(run_dir).model.backbone == str(preset) and run.RunFolder(run_dir).oof.is_file()
    checked = subprocess.run(
        [str(tpu_python), "-c", CHECK_SCRIPT, str(preset), str(run_dir)],
        env=environ,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert checked.returncode == 0, checked.stderr[-3000:]
    lines = checked.stdout.strip().splitlines()
    assert "stem 4 True True" in lines and "predict (3, 19)" in lines, checked.stdout


@pytest.mark.network
def test_the_image_set_is_resolved_again_in_one_command(tmp_path, cli):
    """`kaggle image-set` runs pip's resolver for Python 3.12 over a recipe and writes the pins with source and date
    (here a two-line recipe, so the test is quick: the real one is .ci/kaggle-tpu-recipe.txt). It needs the package
    index pip is set to use (a mirror will do): without one, skipped in one line."""
    import datetime

    from hpa_nb.kaggle import image_set

    python = str(tpu_venv_python("2026-12"))
    asked = subprocess.run(
        [python, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-q", "-d", str(tmp_path / "probe"), "tqdm"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if asked.returncode != 0:
        pytest.skip("no package index answers pip here, so `kaggle image-set` cannot resolve: not run")
    recipe = tmp_path / "recipe.txt"
    recipe.write_text("# Source: a stand-in recipe\ntqdm\nnumpy<2.6\n")
    out = image_set.write(
        recipe, tmp_path / "set.txt", python, touched=("numpy", "tqdm"), today=datetime.date(2026, 12, 6)
    )
    lines = out.read_text().splitlines()
    assert "resolved on 2026-12-06 for Python 3.12" in lines[0] and "# Source: a stand-in recipe" in lines
    pins = [line for line in lines if not line.startswith("#")]
    assert [pin.split("==")[0] for pin in pins] == ["numpy", "tqdm"] and pins[0].startswith("numpy==2.")
    recipe.write_text("no-such-package-hpa-nb==9.9\n")
    result = cli("kaggle", "image-set", "--recipe", recipe, "--out", tmp_path / "bad.txt", "--python", python)
    assert result.status == 2 and result.errors[0].startswith(f"error: pip could not resolve {recipe}:")
    assert not (tmp_path / "bad.txt").exists()
