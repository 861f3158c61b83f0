"""hpa_nb.training.preflight: a full Kaggle run stops before training on the sample or a CPU; versions are reported."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import pytest

from hpa_nb.training import preflight
from hpa_nb.training.preflight import PreflightError
from hpa_nb.training.run import RunFolder

REPO = Path(__file__).resolve().parents[1]
KAGGLE = {"KAGGLE_KERNEL_RUN_TYPE": "Batch"}


def test_the_sample_is_refused_only_for_a_full_run_on_kaggle(small_sample, tmp_path):
    assert preflight.is_synthetic(small_sample) and not preflight.is_synthetic(tmp_path)
    with pytest.raises(PreflightError, match="competition data is not attached") as refused:
        preflight.check_data(small_sample, quick=False, environ=KAGGLE)
    assert "\n" not in str(refused.value) and "ALLOW_SAMPLE_DATA" in str(refused.value)
    preflight.check_data(small_sample, quick=True, environ=KAGGLE)  # a smoke run on purpose
    preflight.check_data(small_sample, quick=False, allow_sample_data=True, environ=KAGGLE)
    preflight.check_data(small_sample, quick=False, environ={})  # off Kaggle the sample is the default
    preflight.check_data(tmp_path, quick=False, environ=KAGGLE)  # real data


def test_a_cpu_is_refused_only_for_a_full_run_on_kaggle():
    with pytest.raises(PreflightError, match="identity verification") as refused:
        preflight.check_accelerator("cpu", quick=False, environ=KAGGLE)
    assert all(word in str(refused.value) for word in ("TPU v5e-8", "QUICK", "ALLOW_CPU"))
    preflight.check_accelerator("tpu", quick=False, environ=KAGGLE)
    preflight.check_accelerator("cpu", quick=True, environ=KAGGLE)
    preflight.check_accelerator("cpu", quick=False, allow_cpu=True, environ=KAGGLE)
    preflight.check_accelerator("cpu", quick=False, environ={})


def test_a_full_kaggle_run_stops_before_training_with_one_line(small_sample, tmp_path, cli, monkeypatch):
    for name, value in KAGGLE.items():
        monkeypatch.setenv(name, value)
    on_sample = cli("train", "--data", small_sample, "--out", tmp_path / "a" / "run")
    assert on_sample.status == 2 and len(on_sample.errors) == 1
    assert "competition data is not attached" in on_sample.errors[0] and "Traceback" not in on_sample.err
    assert not RunFolder(tmp_path / "a" / "run").checkpoints.exists()

    real_looking = tmp_path / "data"
    shutil.copytree(small_sample, real_looking)
    (real_looking / "sample.json").unlink()
    on_cpu = cli("train", "--data", real_looking, "--out", tmp_path / "b" / "run")
    assert on_cpu.status == 2 and len(on_cpu.errors) == 1 and "found only a CPU" in on_cpu.errors[0]
    assert not RunFolder(tmp_path / "b" / "run").checkpoints.exists()


def test_versions_outside_the_tested_range_are_named():
    assert preflight.untested({"python": "3.12.1", "numpy": "2.5.2", "keras": "3.15.1", "jax": None}) == []
    lines = preflight.untested({"numpy": "2.6.0", "keras": "3.4.1", "tensorflow": "2.22.0rc1"})
    assert lines == [
        "numpy 2.6.0 is outside the tested range >=1.26,<2.6",
        "keras 3.4.1 is outside the tested range >=3.5,<3.16",
        "tensorflow 2.22.0rc1 is outside the tested range >=2.16,<2.22",
    ]


def test_report_prints_every_version_and_warns_on_untested_ones(monkeypatch, capsys):
    monkeypatch.setattr(preflight, "installed_versions", lambda: {"python": "3.12.1", "keras": "9.0", "jax": None})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        preflight.report_versions()
    assert capsys.readouterr().out == "versions: python 3.12.1, keras 9.0, jax not installed\n"
    assert [str(warning.message).split(":")[0] for warning in caught] == [
        "keras 9.0 is outside the tested range >=3.5,<3.16"
    ]


def test_the_tested_ranges_are_the_bounds_of_requirements_txt_and_admit_the_tpu_image():
    requirements = (REPO / "requirements.txt").read_text() + (REPO / "requirements-dev.txt").read_text()
    for name in ("keras", "numpy", "tensorflow", "jax"):
        low, high = preflight.TESTED_VERSIONS[name]
        lines = re.findall(
            rf"^{name}(?:-cpu)?(?:\[cpu\])?>={re.escape(low)},<{re.escape(high)}\b", requirements, flags=re.M
        )
        assert lines, f"requirements do not bound {name} as >={low},<{high}"
    for package_set in ("requirements-kaggle-tpu.txt", "requirements-kaggle-tpu-2026-12.txt"):  # August and today
        image = (REPO / package_set).read_text()
        pins = dict(re.findall(r"^([a-z-]+)(?:\[cpu\])?==(\S+)$", image, flags=re.M))
        versions = {
            "keras": pins["keras"],
            "numpy": pins["numpy"],
            "jax": pins["jax"],
            "tensorflow": pins["tensorflow-cpu"],
        }
        assert preflight.untested(versions) == [], package_set


def test_a_tpu_vm_whose_jax_sees_no_tpu_stops_naming_jax_jaxlib_and_libtpu():
    tpu_vm = {"ISTPUVM": "1", **KAGGLE}
    for quick in (True, False):  # even a smoke run: the session was meant for the chips
        with pytest.raises(preflight.PreflightError) as stopped:
            preflight.check_accelerator("cpu", quick=quick, environ=tpu_vm)
        message = str(stopped.value)
        assert re.search(r"JAX sees no TPU \(cpu only\) with jax [\d.]+, jaxlib [\d.]+, libtpu not installed", message)
        assert "\n" not in message
    preflight.check_accelerator("tpu", quick=False, environ=tpu_vm)
    preflight.check_accelerator("cpu", quick=False, allow_cpu=True, environ=tpu_vm)
