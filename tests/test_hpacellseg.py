"""HPA-Cell-Segmentation with today's libraries (`hpa_nb.segmentation.hpacellseg`), against a stand-in of the package.

The real package is not on PyPI and CI has no GitHub, so `tests/standins/` holds a stand-in with the
package's module names and call signatures that keeps every break (see its docstring). It runs in a venv
of `.ci/hpacellseg-venv.txt` (torch's CPU build, numpy 1.26, scikit-image 0.26), built once and cached;
`make test` passes its path as HPA_HCS_VENV.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ROOT / "tests" / "standins" / "checks.py"


def _run_in_venv(script: Path, scratch: Path) -> dict:
    venv = (
        os.environ.get("HPA_HCS_VENV")
        or subprocess.run(
            ["bash", str(ROOT / ".ci" / "hpacellseg-venv"), sys.executable], check=True, capture_output=True, text=True
        ).stdout.strip()
    )
    done = subprocess.run(
        [str(Path(venv) / "bin" / "python"), str(script), str(scratch)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HPA_CACHE": str(scratch / "cache")},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hcs")


@pytest.fixture(scope="module")
def seen(scratch) -> dict:
    return _run_in_venv(CHECKS, scratch)


@pytest.fixture(scope="module")
def seen_offline(seen, scratch) -> dict:
    """A second process, after `seen` built the offline folder in `scratch`."""
    return _run_in_venv(CHECKS.parent / "offline_run.py", scratch)


@pytest.mark.slow
def test_the_stand_in_keeps_each_break_of_the_real_package(seen):
    assert seen["torch"].startswith("2.13") and seen["numpy"] == "1.26.4"
    assert seen["default_load"] == "UnpicklingError"  # torch >= 2.6 loads weights only
    assert "multichannel" in seen["unpatched_rescale"]
    assert "has no attribute 'bool'" in seen["unpatched_label_cell"]
    assert seen["package_shape_for_256x320"] == [320, 256]  # the package's resize back transposes the shape
    assert seen["cells_at_fixed_areas"] == 0  # 2,800 px cells fall under its 5,500 px


@pytest.mark.slow
def test_the_adapter_loads_patches_in_scope_and_keeps_orientation_and_small_cells(seen):
    assert seen["loaded"] == "PixelUnet"  # the whole pickled module, out of its DataParallel
    assert seen["numpy_bool_after_patch"] is False and seen["skimage_rescale_after_patch"] == "unchanged"
    assert seen["labels_shape"] == [256, 320]
    assert seen["cells"] == 2 and min(seen["planted_ious"]) > 0.9
    assert seen["missing_file"].startswith("hpacellseg model file ") and "missing.pth not found" in seen["missing_file"]
    assert "PyPI's pytorch-zoo" in seen["wrong_zoo"] and "pytorch_zoo.unet" in seen["wrong_zoo"]
    assert seen["fork_without_torchvision"].startswith("hpacellseg's pytorch_zoo fork needs torchvision")


@pytest.mark.slow
def test_the_wrong_model_files_stop_in_one_line(seen):
    take = "hpacellseg's U-Nets take 3 and give 3 (use the hosts' dpn_unet_nuclei_v1.pth and dpn_unet_cell_3ch_v1.pth)"
    assert seen["wrong_four_planes.pth"] == f"SCRATCH/four_planes.pth takes 4 channels and gives 3: {take}"
    assert seen["wrong_plain_conv.pth"].startswith("SCRATCH/plain_conv.pth does not run on a 3-channel image (")
    assert seen["wrong_classifier.pth"] == f"SCRATCH/classifier.pth takes 3 channels and gives 8: {take}"
    assert seen["pair_two_channel"] == (
        "SCRATCH/dpn_unet_cell_v2.pth is HPA-Cell-Segmentation's 2-channel cell "
        "model: hpa-nb feeds the ER channel and needs the 3-channel one, "
        "dpn_unet_cell_3ch_v1.pth"
    )
    assert seen["pair_nuclei_as_cell"].startswith("SCRATCH/dpn_unet_nuclei_v1.pth is named as a nuclei model but")
    assert seen["pair_one_file_twice"] == (
        "SCRATCH/cell-model.pth is given as both the nuclei and the cell model: they are two files"
    )


@pytest.mark.slow
def test_a_built_offline_folder_segments_in_a_process_that_has_only_the_folder(seen_offline, scratch):
    assert seen_offline["importable_before"] is False
    assert Path(seen_offline["package_from"]).is_relative_to(scratch / "cache")  # unpacked from the folder's zip
    assert seen_offline["labels_shape"] == [256, 320] and min(seen_offline["ious"]) > 0.9
    assert not [w for w in seen_offline["warnings"] if "deprecated" in w or "Only one label" in w], seen_offline


def test_submit_with_hpacellseg_and_no_torch_says_so_in_one_line(small_sample, trained_run, tmp_path, cli):
    if any(Path(p, "torch").is_dir() for p in sys.path if p):
        pytest.skip("torch is installed in this venv")
    result = cli(
        "submit",
        "--model",
        trained_run,
        "--data",
        small_sample,
        "--segmentation",
        "hpacellseg",
        "--out",
        tmp_path / "s.csv",
    )
    result.assert_one_error_line(
        "hpacellseg needs torch (No module named 'torch'): pip install torch (on Kaggle it is preinstalled)"
    )
