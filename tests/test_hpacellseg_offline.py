"""The offline HPA-Cell-Segmentation folder (`hpa_nb.segmentation.offline`): built from the downloads, found
where Kaggle mounts it, and chosen by the submission notebook. No torch needed: the weights here are
placeholder bytes, and the package is a one-line module that says where it was imported from. The torch
venv's run of a built folder is in `tests/test_hpacellseg.py`."""

import importlib
import sys
import zipfile
from pathlib import Path

import pytest

from hpa_nb.segmentation import offline


@pytest.fixture
def downloads(tmp_path) -> dict[str, Path]:
    """What a user has after cloning the two repositories and downloading the weights from Zenodo."""
    package = tmp_path / "HPA-Cell-Segmentation"
    (package / "hpacellseg").mkdir(parents=True)
    (package / "hpacellseg" / "cellsegmentator.py").write_text("WHERE = __file__\n")
    (package / "hpacellseg" / "__init__.py").write_text("")
    (package / "hpacellseg" / "VERSION").write_text("0.1.8\n")
    (package / "LICENSE").write_text("Apache License 2.0\n")
    (package / "setup.py").write_text("raise SystemExit('not packed')\n")
    fork = tmp_path / "pytorch_zoo"
    (fork / "pytorch_zoo" / "inplace_abn" / "modules" / "src").mkdir(parents=True)
    (fork / "pytorch_zoo" / "__init__.py").write_text("")
    (fork / "pytorch_zoo" / "unet.py").write_text("WHERE = __file__\n")
    (fork / "pytorch_zoo" / "inplace_abn" / "modules" / "src" / "bn.o").write_bytes(b"\x7fELF")
    (fork / "pytorch_zoo" / "__pycache__").mkdir()
    (fork / "pytorch_zoo" / "__pycache__" / "unet.cpython-37.pyc").write_bytes(b"stale")
    weights = tmp_path / "zenodo"
    weights.mkdir()
    for name in ("dpn_unet_nuclei_v1.pth", "dpn_unet_cell_3ch_v1.pth", "dpn_unet_cell_v2.pth"):
        (weights / name).write_bytes(name.encode())
    return {"package": package, "fork": fork, "weights": weights}


@pytest.fixture
def clean_imports(monkeypatch):
    """sys.path and the two packages' modules as they were, after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name in [name for name in sys.modules if name.split(".")[0] in ("hpacellseg", "pytorch_zoo")]:
        del sys.modules[name]


def test_build_lays_out_the_folder_from_the_downloads(downloads, tmp_path):
    out = offline.build(downloads["package"], downloads["fork"], downloads["weights"], tmp_path / "a", "someone")
    assert sorted(p.name for p in out.iterdir()) == [
        "cell-model.pth",
        "dataset-metadata.json",
        "hpacellseg-sources.zip",
        "nuclei-model.pth",
    ]
    assert (out / "cell-model.pth").read_bytes() == b"dpn_unet_cell_3ch_v1.pth"  # the 3-channel file, renamed
    assert (out / "nuclei-model.pth").read_bytes() == b"dpn_unet_nuclei_v1.pth"
    assert '"id": "someone/hpacellseg-offline"' in (out / "dataset-metadata.json").read_text()
    with zipfile.ZipFile(out / offline.SOURCES_ZIP) as archive:
        names = sorted(archive.namelist())
    assert names == [
        "hpacellseg/LICENSE",
        "hpacellseg/VERSION",
        "hpacellseg/__init__.py",
        "hpacellseg/cellsegmentator.py",
        "pytorch_zoo/__init__.py",
        "pytorch_zoo/unet.py",
    ]
    again = offline.build(downloads["package"], downloads["fork"], downloads["weights"], tmp_path / "b", "someone")
    assert (again / offline.SOURCES_ZIP).read_bytes() == (out / offline.SOURCES_ZIP).read_bytes()
    assert not list(out.glob(".tmp-*"))


@pytest.mark.parametrize(
    "case, expected",
    [
        (
            "pypi zoo",
            "is PyPI's pytorch-zoo (no pytorch_zoo/unet.py), not the fork hpacellseg needs: clone "
            "github.com/haoxusci/pytorch_zoo",
        ),
        (
            "two-channel only",
            "dpn_unet_cell_v2.pth is HPA-Cell-Segmentation's 2-channel cell model: hpa-nb feeds the "
            "ER channel and needs the 3-channel one, dpn_unet_cell_3ch_v1.pth",
        ),
        ("no nuclei model", "lacks dpn_unet_nuclei_v1.pth: download it from zenodo.org/record/4665863"),
        (
            "not the package",
            "holds no hpacellseg/cellsegmentator.py: clone github.com/CellProfiling/HPA-Cell-Segmentation",
        ),
    ],
)
def test_build_stops_in_one_line_on_the_wrong_downloads(downloads, tmp_path, cli, case, expected):
    package, fork, weights = downloads["package"], downloads["fork"], downloads["weights"]
    if case == "pypi zoo":
        (fork / "pytorch_zoo" / "unet.py").unlink()
    elif case == "two-channel only":
        (weights / "dpn_unet_cell_3ch_v1.pth").unlink()
    elif case == "no nuclei model":
        (weights / "dpn_unet_nuclei_v1.pth").unlink()
    else:
        package = fork
    result = cli(
        "kaggle",
        "hpacellseg-dataset",
        "--package",
        package,
        "--fork",
        fork,
        "--weights",
        weights,
        "--out",
        tmp_path / "out",
        "--username",
        "someone",
    )
    assert result.status == 2 and len(result.errors) == 1 and result.errors[0].endswith(expected), result.err
    assert "Traceback" not in result.err and not (tmp_path / "out" / "cell-model.pth").exists()


def _mount(downloads, input_root: Path, layout: str) -> Path:
    """Lay the pieces out under a stand-in /kaggle/input as a user may have attached them."""
    if layout == "built":  # this project's folder, mounted at a nested path as Kaggle now does
        return offline.build(
            downloads["package"],
            downloads["fork"],
            downloads["weights"],
            input_root / "datasets" / "someone" / "hpacellseg-offline",
            "someone",
        )
    if layout == "zip unpacked":  # Kaggle unpacked the archive into a folder of its name
        built = offline.build(
            downloads["package"], downloads["fork"], downloads["weights"], input_root / "hpacellseg-offline", "someone"
        )
        with zipfile.ZipFile(built / offline.SOURCES_ZIP) as archive:
            archive.extractall(built / "hpacellseg-sources")
        (built / offline.SOURCES_ZIP).unlink()
        return built
    # plain clones and the Zenodo files, as three datasets
    for name in ("package", "fork", "weights"):
        target = input_root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        downloads[name].rename(target)
    (input_root / "weights" / "dpn_unet_cell_v2.pth").unlink()
    return input_root


@pytest.mark.parametrize("layout", ["built", "zip unpacked", "clones"])
def test_resolve_finds_each_layout_under_kaggle_input_and_imports_from_it(downloads, tmp_path, clean_imports, layout):
    input_root = tmp_path / "input"
    (input_root / "hpa-single-cell-image-classification" / "train").mkdir(parents=True)
    _mount(downloads, input_root, layout)
    environ = {"KAGGLE_KERNEL_RUN_TYPE": "Batch", "HPA_CACHE": str(tmp_path / "cache")}
    sources = offline.resolve(environ=environ, input_root=input_root)
    assert sources.nuclei_model.read_bytes() == b"dpn_unet_nuclei_v1.pth"
    assert sources.cell_model.read_bytes() == b"dpn_unet_cell_3ch_v1.pth"
    package = importlib.import_module("hpacellseg.cellsegmentator")
    fork = importlib.import_module("pytorch_zoo.unet")
    if layout == "built":  # unpacked into the cache: /kaggle/input is read-only, and the package reads VERSION
        assert Path(package.WHERE).is_relative_to(tmp_path / "cache")
        assert (Path(package.WHERE).parent / "VERSION").read_text() == "0.1.8\n"
    else:
        assert Path(package.WHERE).is_relative_to(input_root) and Path(fork.WHERE).is_relative_to(input_root)
    assert offline.choose_segmentation(environ, input_root)[0] == ("hpacellseg" if _has_torch() else "classical")


def _has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def test_resolve_and_choose_say_what_is_missing(downloads, tmp_path, monkeypatch):
    input_root = tmp_path / "input"
    environ = {"KAGGLE_KERNEL_RUN_TYPE": "Batch"}
    (input_root / "weights").mkdir(parents=True)
    (input_root / "weights" / "dpn_unet_cell_v2.pth").write_bytes(b"2ch")
    with pytest.raises(ValueError, match="dpn_unet_cell_v2.pth is HPA-Cell-Segmentation's 2-channel cell model"):
        offline.resolve(environ=environ, input_root=input_root)
    (input_root / "weights" / "dpn_unet_cell_v2.pth").unlink()
    (input_root / "weights" / "cell-model.pth").write_bytes(b"3ch")
    with pytest.raises(FileNotFoundError, match=r"^no nuclei-model.pth \(or their Zenodo names\) in .*input: see "):
        offline.resolve(environ=environ, input_root=input_root)
    with pytest.raises(FileNotFoundError, match="HPA-Cell-Segmentation folder .*nowhere not found"):
        offline.resolve(tmp_path / "nowhere")

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "torch" else None)
    method, why = offline.choose_segmentation(environ, input_root)
    assert method == "classical" and why.startswith(
        f"classical segmentation (no complete HPA-Cell-Segmentation folder in {input_root}"
    )
    (input_root / "weights" / "nuclei-model.pth").write_bytes(b"n")
    assert offline.choose_segmentation(environ, input_root)[0] == "classical"  # the weights, but no code
    _mount(downloads, input_root / "code", "built")
    method, why = offline.choose_segmentation(environ, input_root)
    assert method == "hpacellseg" and why.startswith("hpacellseg segmentation, the hosts' tool: weights ")
    assert offline.choose_segmentation({}, input_root)[0] == "classical"  # off Kaggle: the current folder


def test_choose_without_torch_says_so():
    if _has_torch():
        pytest.skip("torch is installed in this venv")
    assert offline.choose_segmentation() == (
        "classical",
        "classical segmentation (hpacellseg needs torch, which is not installed)",
    )
