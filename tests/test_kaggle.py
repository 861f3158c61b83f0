"""Kaggle kernels: metadata, self-contained bundles, the official CLI's push request, and the Kaggle runtime.

The push tests drive the official `kaggle` package's own `KaggleApi.kernels_push` with its one network
call (`KernelsApiClient.save_kernel`) intercepted, so they check what Kaggle would actually receive.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest
import requests
from kagglesdk.kernels.services.kernels_api_service import KernelsApiClient
from kagglesdk.kernels.types.kernels_api_service import ApiSaveKernelResponse

from hpa_nb import cli
from hpa_nb.core import chain
from hpa_nb.core.env import COMPETITION, find_competition_dir, on_kaggle, on_tpu_vm, select_backend, working_dir
from hpa_nb.kaggle import kernels
from hpa_nb.kaggle import push as kaggle
from hpa_nb.sample.sources import find_data

SECRETS = {
    "kaggle.json key": "kjson0secret0key0123456789",
    "KAGGLE_KEY": "env0secret0key0987654321",
    "KAGGLE_API_TOKEN": "KGAT_token0secret0abcdef",
}

# Stand-ins for the lead's notebooks: same shape (header, `parameters` cell, `import hpa_nb`), tiny work.
STANDIN_TRAIN = """\
# %% [markdown]
# # Stand-in training notebook
# A header cell, as the real notebooks have.

# %% tags=["parameters"]
QUICK = False
EPOCHS = 30
RESUME_FROM = ""
SHARDS = ""
FOLDS = None
FOLD = 0

# %%
import json
import sys

import hpa_nb
from hpa_nb.sample.sources import find_data
from hpa_nb.core.env import working_dir
from hpa_nb.core.labels import parse_label

source = find_data()
print(source)

# %% [markdown]
# Read the labels and leave a probe in the working folder.

# %%
import csv

with open(source.path / "train.csv", newline="") as handle:
    labels = [parse_label(row["Label"], row["ID"]) for row in csv.DictReader(handle)]
out = working_dir()
out.mkdir(parents=True, exist_ok=True)
probe = {"hpa_nb": hpa_nb.__file__, "sys_path": sys.path, "kind": source.kind, "images": len(labels),
         "quick": QUICK, "epochs": EPOCHS}
(out / "probe.json").write_text(json.dumps(probe))
"""

STANDIN_OTHER = """\
# %% [markdown]
# # Stand-in {name}

# %% tags=["parameters"]
QUICK = False
RESUME_FROM = ""

# %%
import hpa_nb
print(hpa_nb.N_CLASSES)
"""


@pytest.fixture()
def clean_home(tmp_path, monkeypatch) -> Path:
    """A HOME and environment without any Kaggle credentials."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for key in list(os.environ):
        if key.startswith("KAGGLE_"):
            monkeypatch.delenv(key)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    return home


def write_notebooks(folder: Path, names=tuple(chain.KERNELS)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        text = STANDIN_TRAIN if name == "03_train" else STANDIN_OTHER.format(name=name)
        (folder / f"{name}.py").write_text(text)
    return folder


@pytest.fixture(scope="module")
def standin_notebooks(tmp_path_factory) -> Path:
    return write_notebooks(tmp_path_factory.mktemp("notebooks"))


@pytest.fixture(scope="module")
def standin_bundles(tmp_path_factory, standin_notebooks) -> Path:
    out = tmp_path_factory.mktemp("bundles")
    kernels.build_all(out_dir=out, notebooks_dir=standin_notebooks)
    return out


@pytest.fixture(scope="module")
def kaggle_api(tmp_path_factory):
    """The official KaggleApi, imported and run without credentials or network; returns push(folder)."""
    config = tmp_path_factory.mktemp("kaggle_config")
    with pytest.MonkeyPatch.context() as patch:
        # Importing `kaggle` authenticates and creates its config folder: keep both away from the real HOME.
        for key in list(os.environ):
            if key.startswith("KAGGLE_"):
                patch.delenv(key)
        patch.setenv("HOME", str(config))
        patch.setenv("KAGGLE_CONFIG_DIR", str(config))
        with contextlib.redirect_stdout(io.StringIO()):  # it prints auth help when there are no credentials
            from kaggle.api import kaggle_api_extended
    with pytest.MonkeyPatch.context() as patch:
        captured = []

        def save_kernel(self, request=None):
            captured.append(request)
            return ApiSaveKernelResponse()

        def no_network(*args, **kwargs):
            raise AssertionError("kernels_push tried to reach the network")

        patch.setattr(KernelsApiClient, "save_kernel", save_kernel)
        patch.setattr(kaggle_api_extended.KaggleApi, "authenticate", lambda self: None)
        patch.setattr(requests.Session, "send", no_network)

        def push(folder: Path):
            api = kaggle_api_extended.KaggleApi()
            api.authenticate()  # as the CLI does before a command; patched to need no credentials
            captured.clear()
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                api.kernels_push(str(folder))
            assert len(captured) == 1
            return captured[0], printed.getvalue()

        push.slugify = kaggle_api_extended.slugify  # the slug rule kaggle itself applies to titles
        yield push


def bootstrap_cells(notebook) -> list:
    return [cell for cell in notebook.cells if kernels.BOOTSTRAP_TAG in cell.metadata.get("tags", [])]


# --- metadata -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [*chain.KERNELS, "08_cell_crops"])
def test_kernel_metadata_for_every_notebook(name, kaggle_api):
    metadata = kernels.kernel_metadata(name)
    owner, slug = metadata["id"].split("/")
    assert owner == "USERNAME" and slug == "hpa-" + name.replace("_", "-")
    assert kaggle_api.slugify(metadata["title"]) == slug  # else Kaggle files the kernel under another URL
    assert metadata["language"] == "python" and metadata["kernel_type"] == "notebook"
    assert metadata["competition_sources"] == [COMPETITION]
    assert metadata["is_private"] is True
    assert metadata["code_file"] == f"{name}.ipynb"
    assert "docker_image" not in metadata and "docker_image_pinning_type" not in metadata


def test_only_training_asks_for_the_tpu_and_submission_runs_offline():
    shapes = {name: kernels.kernel_metadata(name).get("machine_shape") for name in chain.KERNELS}
    assert shapes == {
        "00_prepare": None,
        "01_eda": None,
        "02_augmentation": None,
        "03_train": "TpuV5E8",
        "04_evaluate": None,
        "06_cells": None,
        "07_cell_train": "TpuV5E8",
        "05_submission": None,
    }
    assert {name for name in chain.KERNELS if kernels.kernel_metadata(name)["enable_tpu"]} == {
        "03_train",
        "07_cell_train",
    }
    assert not any(kernels.kernel_metadata(name)["enable_gpu"] for name in chain.KERNELS)
    assert kernels.kernel_metadata("03_train")["enable_internet"] is True  # ImageNet weights download
    assert kernels.kernel_metadata("05_submission")["enable_internet"] is False  # code-competition rule
    assert kernels.kernel_metadata("00_prepare")["enable_internet"] is False  # it reads only the competition


def test_kernel_metadata_takes_username_and_offline_sources():
    metadata = kernels.kernel_metadata(
        "04_evaluate", "alice", enable_internet=False, dataset_sources=["alice/imagenet-weights"]
    )
    assert metadata["id"] == "alice/hpa-04-evaluate"
    assert metadata["kernel_sources"] == ["alice/hpa-03-train"]
    assert metadata["enable_internet"] is False
    assert metadata["dataset_sources"] == ["alice/imagenet-weights"]
    metadata["competition_sources"].append("mutated")
    assert kernels.kernel_metadata("04_evaluate")["competition_sources"] == [COMPETITION]
    with pytest.raises(ValueError, match="a/b"):
        kernels.kernel_metadata("03_train", "a/b")


def test_root_metadata_is_the_training_kernel():
    committed = json.loads(kernels.ROOT_METADATA.read_text())
    owner = committed["id"].split("/")[0]  # a user may have put their name in; the rest must match
    assert committed == kernels.root_metadata(owner)
    assert committed["code_file"] == "build/kaggle/03_train/03_train.ipynb"
    assert committed["machine_shape"] == "TpuV5E8" and committed["enable_tpu"] is True


def test_committed_bundle_folder_is_tracked_by_git():
    if shutil.which("git") is None or not (kernels.REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "build/kaggle/03_train/03_train.ipynb"], cwd=kernels.REPO_ROOT, check=False
    )
    assert ignored.returncode == 1, "build/kaggle/ is git-ignored: the committed bundle would be lost"


# --- bundles --------------------------------------------------------------------------------
def test_build_is_deterministic_and_embeds_exactly_the_package(tmp_path, standin_notebooks):
    first = kernels.build_bundle("03_train", tmp_path / "a", notebooks_dir=standin_notebooks)
    second = kernels.build_bundle("03_train", tmp_path / "b", notebooks_dir=standin_notebooks)
    assert sorted(path.name for path in first.iterdir()) == ["03_train.ipynb", "kernel-metadata.json"]
    for file in ("03_train.ipynb", "kernel-metadata.json"):
        assert (first / file).read_bytes() == (second / file).read_bytes()
    _, members = kernels.bundle_fingerprint((first / "03_train.ipynb").read_text())
    expected = {
        f"hpa_nb/{path.relative_to(kernels.PACKAGE_DIR).as_posix()}": path.read_bytes()
        for path in kernels.PACKAGE_DIR.rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert members == expected
    assert {"hpa_nb/__init__.py", "hpa_nb/core/__init__.py", "hpa_nb/training/train.py"} <= set(members)


def test_bundles_share_one_package_archive_and_are_current_once_built(tmp_path, standin_notebooks):
    build = tmp_path / "build"
    names = ["03_train", "01_eda"]
    kernels.build_all(names, out_dir=build, notebooks_dir=standin_notebooks)
    assert kernels.stale_bundles(build, standin_notebooks) == []
    first, second = (bootstrap_cells(nbformat.read(build / name / f"{name}.ipynb", as_version=4)) for name in names)
    assert first == second


def test_bundle_is_the_notebook_plus_one_first_code_cell(standin_bundles, standin_notebooks):
    import jupytext

    bundled = nbformat.read(standin_bundles / "03_train" / "03_train.ipynb", as_version=4)
    original = jupytext.read(standin_notebooks / "03_train.py")
    code_cells = [cell for cell in bundled.cells if cell.cell_type == "code"]
    assert bootstrap_cells(bundled) == code_cells[:1]
    rest = [cell for cell in bundled.cells if cell not in code_cells[:1]]
    assert [(c.cell_type, c.source, c.metadata) for c in rest] == [
        (c.cell_type, c.source, c.metadata) for c in original.cells
    ]


def test_staleness_check_sees_notebook_and_package_changes(tmp_path, standin_notebooks):
    package = tmp_path / "hpa_nb"
    shutil.copytree(kernels.PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    notebooks = tmp_path / "notebooks"
    shutil.copytree(standin_notebooks, notebooks)
    build = tmp_path / "build"
    kernels.build_all(["03_train", "01_eda"], out_dir=build, notebooks_dir=notebooks, package_dir=package)
    check = lambda: kernels.stale_bundles(build, notebooks, package)  # noqa: E731
    assert check() == []

    with (package / "labels.py").open("a") as handle:
        handle.write("\n# changed\n")
    assert [line for line in check() if "03_train" in line and "stale" in line]
    kernels.build_all(out_dir=build, notebooks_dir=notebooks, package_dir=package)
    assert check() == []

    (notebooks / "01_eda.py").write_text(STANDIN_OTHER.format(name="edited"))
    assert [line for line in check() if "01_eda" in line]
    shutil.rmtree(build / "03_train")
    assert any("03_train is missing" in line for line in check())


def test_committed_bundles_are_current():
    if not kernels.notebook_names():
        pytest.skip("no notebooks/*.py yet")
    problems = kernels.stale_bundles()
    assert problems == [], "run `make kaggle` and commit build/kaggle/: " + "; ".join(problems)


def test_bundles_never_contain_credentials_or_other_files(tmp_path, clean_home, monkeypatch, standin_notebooks):
    (clean_home / ".kaggle").mkdir()
    (clean_home / ".kaggle" / "kaggle.json").write_text(
        json.dumps({"username": "alice", "key": SECRETS["kaggle.json key"]})
    )
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", SECRETS["KAGGLE_KEY"])
    monkeypatch.setenv("KAGGLE_API_TOKEN", SECRETS["KAGGLE_API_TOKEN"])
    package = tmp_path / "hpa_nb"
    shutil.copytree(kernels.PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "kaggle.json").write_text(json.dumps({"key": SECRETS["kaggle.json key"]}))
    (package / "notes.txt").write_text(SECRETS["KAGGLE_KEY"])
    (package / "sub").mkdir()
    (package / "sub" / "x.py").write_text(f"KEY = {SECRETS['KAGGLE_KEY']!r}\n")

    folder = kernels.build_bundle("03_train", tmp_path / "out", "alice", standin_notebooks, package)
    assert sorted(path.name for path in folder.iterdir()) == ["03_train.ipynb", "kernel-metadata.json"]
    _, members = kernels.bundle_fingerprint((folder / "03_train.ipynb").read_text())
    assert sorted(members) == sorted(
        f"hpa_nb/{path.relative_to(kernels.PACKAGE_DIR).as_posix()}"
        for path in kernels.PACKAGE_DIR.rglob("*.py")
        if "__pycache__" not in path.parts
    )
    assert "hpa_nb/sub/x.py" not in members
    everything = b"".join([*(path.read_bytes() for path in folder.iterdir()), *members.values()])
    for what, secret in SECRETS.items():
        assert secret.encode() not in everything, f"{what} leaked into the bundle"


# --- what kaggle kernels push sends ---------------------------------------------------------
@pytest.mark.parametrize("name", list(chain.KERNELS))
def test_official_push_request_for_each_bundle(name, kaggle_api, standin_bundles):
    request, printed = kaggle_api(standin_bundles / name)
    expected = kernels.kernel_metadata(name)
    assert request.slug == expected["id"] == f"USERNAME/hpa-{name.replace('_', '-')}"
    assert "does not resolve" not in printed
    assert request.new_title == expected["title"]
    assert request.language == "python" and request.kernel_type == "notebook"
    assert request.to_dict().get("machineShape") == expected.get("machine_shape")  # absent means CPU
    assert request.enable_tpu is (name in ("03_train", "07_cell_train"))
    assert request.enable_internet is expected["enable_internet"]
    assert request.competition_data_sources == [COMPETITION]
    assert request.kernel_data_sources == expected["kernel_sources"]
    assert not request.docker_image and "dockerImage" not in request.to_dict()
    notebook = nbformat.reads(request.text, as_version=4)
    nbformat.validate(notebook)
    assert len(bootstrap_cells(notebook)) == 1


@pytest.mark.parametrize(
    "machine, gpu, tpu",
    [
        ("NvidiaTeslaT4Highmem", True, False),
        ("NvidiaL4", True, False),
        ("TpuV6E8", False, True),
        ("none", False, False),
    ],
)
def test_push_accelerator_asks_kaggle_for_that_machine(
    machine, gpu, tpu, clean_home, fake_kaggle_cli, monkeypatch, tmp_path, kaggle_api, standin_notebooks
):
    """`kaggle push 03_train --accelerator MACHINE`: the official client's request names that machine."""
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setattr(kaggle, "PUSH_DIR", tmp_path / "push")
    monkeypatch.setattr(kaggle, "NOTEBOOKS_DIR", standin_notebooks)
    assert cli.main(["kaggle", "push", "03_train", "--accelerator", machine]) == 0
    folder = Path(json.loads(fake_kaggle_cli.read_text())[-1])
    request, _ = kaggle_api(folder)
    assert request.to_dict().get("machineShape") == (None if machine == "none" else machine)
    assert (request.enable_gpu, request.enable_tpu) == (gpu, tpu)
    with pytest.raises(ValueError, match="unknown Kaggle accelerator 'NvidiaK80'"):
        kernels.kernel_metadata("03_train", accelerator="NvidiaK80")


@pytest.mark.parametrize(
    "handle, message",
    [
        ("keras/resnet/keras/resnet_50_imagenet", "has 5 parts, OWNER/MODEL/FRAMEWORK/VARIATION/VERSION"),
        ("keras/resnetv1/keras/resnet_50_imagenet/latest", "its VERSION 'latest' is not a whole number"),
        ("keras//keras/resnet_50_imagenet/3", "its MODEL is empty"),
    ],
)
def test_a_model_source_kaggle_would_drop_is_refused_before_the_push(
    handle, message, clean_home, fake_kaggle_cli, monkeypatch, capsys, tmp_path
):
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setattr(kaggle, "PUSH_DIR", tmp_path / "push")
    assert cli.main(["kaggle", "push", "03_train", "--no-internet", "--model", handle]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --model {handle}: ") and message in err
    assert not fake_kaggle_cli.exists() and not (tmp_path / "push").exists()  # nothing built, nothing sent


def test_the_readmes_model_handles_are_keras_hubs_own(tpu_python_december):
    """Every Kaggle Models handle the README and the docs name is in KerasHub 0.32's presets files (December set)."""
    pages = [kernels.REPO_ROOT / "README.md", *sorted((kernels.REPO_ROOT / "docs").rglob("*.md"))]
    readme = "".join(page.read_text() for page in pages)
    handles = sorted(set(re.findall(r"\bkeras/[a-z0-9_]+/keras/[a-z0-9_]+/\d+\b", readme)))
    assert len(handles) >= 11  # the family table's, at least
    probe = (
        "import pathlib, sys, keras_hub; root = pathlib.Path(keras_hub.__file__).parent / 'src' / 'models'; "
        "text = ''.join(path.read_text() for path in root.glob('*/*_presets.py')); "
        "print([h for h in sys.argv[1:] if f'kaggle://{h}' not in text])"
    )
    done = subprocess.run(
        [str(tpu_python_december), "-c", probe, *handles], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", f"not KerasHub handles: {done.stdout}"


def test_plain_push_from_the_repository_root(kaggle_api):
    if not (kernels.NOTEBOOKS_DIR / f"{kernels.ROOT_KERNEL}.py").is_file():
        pytest.skip("notebooks/03_train.py not written yet, so there is no committed bundle to push")
    request, printed = kaggle_api(kernels.REPO_ROOT)
    assert request.slug.endswith("/hpa-03-train") and "does not resolve" not in printed
    assert request.machine_shape == "TpuV5E8" and request.enable_tpu is True
    assert request.competition_data_sources == [COMPETITION] and not request.docker_image
    assert len(bootstrap_cells(nbformat.reads(request.text, as_version=4))) == 1


def run_papermill(notebook_text: str, run_dir: Path, data: Path, *parameters: str) -> subprocess.CompletedProcess:
    """Execute a notebook with papermill in run_dir, with the repository neither on PYTHONPATH nor the cwd."""
    run_dir.mkdir()
    (run_dir / "in.ipynb").write_text(notebook_text)
    environ = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "KERAS_BACKEND", "HPA_OUT") and not key.startswith("KAGGLE_")
    }
    environ.update(HPA_DATA_DIR=str(data), HOME=str(run_dir))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "papermill",
            "in.ipynb",
            "out.ipynb",
            *parameters,
            "-k",
            "python3",
            "--language",
            "python",
            "--cwd",
            str(run_dir),
            "--no-progress-bar",
        ],
        cwd=run_dir,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_kaggle_receives_the_committed_bundle_and_only_its_bootstrap_finds_hpa_nb(tmp_path, kaggle_api, default_sample):
    """The push sends the committed bundle cell for cell; `tests/test_kaggle_tpu_image.py` runs that bundle with
    the repository off sys.path. Without its bootstrap cell the notebook cannot import hpa_nb there."""
    import jupytext

    if not (kernels.BUILD_DIR / kernels.ROOT_KERNEL).is_dir():
        pytest.fail("no committed training bundle: run `make kaggle`")
    request, _ = kaggle_api(kernels.BUILD_DIR / kernels.ROOT_KERNEL)  # exactly the text Kaggle would receive
    sent = nbformat.reads(request.text, as_version=4)
    committed = nbformat.read(kernels.BUILD_DIR / kernels.ROOT_KERNEL / f"{kernels.ROOT_KERNEL}.ipynb", as_version=4)
    assert [cell.source for cell in sent.cells] == [cell.source for cell in committed.cells]
    assert len(bootstrap_cells(sent)) == 1

    plain = jupytext.writes(jupytext.read(kernels.NOTEBOOKS_DIR / f"{kernels.ROOT_KERNEL}.py"), fmt="ipynb")
    completed = run_papermill(plain, tmp_path / "plain", default_sample, "-p", "QUICK", "True")
    assert completed.returncode != 0 and "No module named 'hpa_nb'" in completed.stderr


def test_bootstrap_replaces_an_already_imported_hpa_nb(tmp_path):
    cell = kernels.bootstrap_source()
    script = tmp_path / "rerun.py"
    script.write_text(
        textwrap.dedent("""\
        import sys
        import hpa_nb.core.labels  # the repository's copy, as if a kernel had imported it before
        cell = open(sys.argv[1]).read()
        for _ in range(2):  # a notebook cell can be run twice
            exec(cell, {})
        import hpa_nb.core.labels
        print(hpa_nb.core.labels.__file__)
    """)
    )
    (tmp_path / "cell.py").write_text(cell)
    environ = {**os.environ, "PYTHONPATH": str(kernels.REPO_ROOT)}
    completed = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "cell.py")],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    labels_file = Path(completed.stdout.strip().splitlines()[-1])
    assert labels_file.parent.parent.parent.name.startswith("hpa_nb_src-")
    assert labels_file.read_bytes() == (kernels.PACKAGE_DIR / "core" / "labels.py").read_bytes()


# --- push / status / output through the kaggle CLI ------------------------------------------
@pytest.fixture()
def fake_kaggle_cli(tmp_path, monkeypatch) -> Path:
    """A `kaggle` executable first on PATH that records its arguments; returns the record file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "kaggle-argv.json"
    script = bin_dir / "kaggle"
    script.write_text(
        textwrap.dedent(f"""\
        #!{sys.executable}
        import json, sys
        import os
        if sys.argv[1:] == ["config", "view"]:  # as kaggle 1.7-2.x prints it, the key never shown
            print("Configuration values from " + os.environ.get("HOME", ""))
            print("- username: " + os.environ.get("FAKE_KAGGLE_CONFIG_USERNAME", "None"))
            raise SystemExit(0)
        json.dump(sys.argv[1:], open({str(record)!r}, "w"))
        print(os.environ.get("FAKE_KAGGLE_OUTPUT", "fake kaggle ok"))
        raise SystemExit(int(os.environ.get("FAKE_KAGGLE_EXIT", "0")))
    """)
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return record


def test_push_builds_with_the_username_and_calls_the_cli(
    tmp_path, clean_home, fake_kaggle_cli, monkeypatch, capfd, standin_notebooks
):
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", SECRETS["KAGGLE_KEY"])
    folder = kaggle.push("03_train", push_dir=tmp_path / "push", notebooks_dir=standin_notebooks)
    assert json.loads(fake_kaggle_cli.read_text()) == ["kernels", "push", "-p", str(folder)]
    assert json.loads((folder / "kernel-metadata.json").read_text())["id"] == "alice/hpa-03-train"
    printed = capfd.readouterr()
    assert "fake kaggle ok" in printed.out
    assert SECRETS["KAGGLE_KEY"] not in printed.out + printed.err
    # a KerasHub preset from Kaggle Models, attached to an internet-off kernel (BACKBONE names its handle)
    folder = kaggle.push(
        "03_train",
        push_dir=tmp_path / "push",
        notebooks_dir=standin_notebooks,
        enable_internet=False,
        model_sources=["keras/resnetv1/keras/resnet_50_imagenet/3"],
    )
    metadata = json.loads((folder / "kernel-metadata.json").read_text())
    assert (
        metadata["model_sources"] == ["keras/resnetv1/keras/resnet_50_imagenet/3"] and not metadata["enable_internet"]
    )


@pytest.mark.parametrize(
    "printed",
    [
        "Kernel push error: Notebook not found",
        "The following are not valid competition sources and could not be added to the kernel: ['hpa']",
        # kaggle-cli 2.2 does not print the server's invalid model sources (kagglesdk has the field): when a version
        # does, in the words of the other kinds, the push is refused the same way
        "The following are not valid model sources and could not be added to the kernel: "
        "['keras/resnet/keras/resnet_50_imagenet/2']",
    ],
)
def test_a_push_kaggle_refused_is_one_line_exit_2_although_the_cli_exits_0(
    printed, clean_home, fake_kaggle_cli, monkeypatch, capsys, tmp_path
):
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", SECRETS["KAGGLE_KEY"])
    monkeypatch.setenv("FAKE_KAGGLE_OUTPUT", f"Uploading...\n{printed}")
    monkeypatch.setattr(kaggle, "PUSH_DIR", tmp_path / "push")
    assert cli.main(["kaggle", "push", "03_train"]) == 2
    out, err = capsys.readouterr()
    assert printed in out  # the CLI's own words are shown as they came
    assert err.strip().count("\n") == 0 and err.startswith("error: Kaggle refused") and printed in err
    assert "pushed" not in out


def test_push_resume_from_and_shards_attach_the_kernels_and_set_the_parameters(
    clean_home, fake_kaggle_cli, monkeypatch, tmp_path, standin_notebooks
):
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", SECRETS["KAGGLE_KEY"])
    folder = kaggle.push(
        "03_train",
        push_dir=tmp_path / "push",
        notebooks_dir=standin_notebooks,
        resume_from="alice/hpa-03-train",
        shards="alice/hpa-00-prepare",
    )
    metadata = json.loads((folder / "kernel-metadata.json").read_text())
    assert metadata["kernel_sources"] == ["alice/hpa-03-train", "alice/hpa-00-prepare"]
    cells = json.loads((folder / "03_train.ipynb").read_text())["cells"]
    tags = [cell["metadata"].get("tags", []) for cell in cells]
    injected = tags.index(["injected-parameters"])
    assert tags[injected - 1] == ["parameters"]
    source = "".join(cells[injected]["source"])
    assert "RESUME_FROM = 'alice/hpa-03-train'" in source and "SHARDS = 'alice/hpa-00-prepare'" in source
    with pytest.raises(ValueError, match="OWNER/KERNEL"):
        kaggle.push("03_train", push_dir=tmp_path / "push", notebooks_dir=standin_notebooks, resume_from="/kaggle/x")
    with pytest.raises(ValueError, match="has no parameter SHARDS"):  # a notebook that would ignore it
        kaggle.push(
            "04_evaluate", push_dir=tmp_path / "push", notebooks_dir=standin_notebooks, shards="alice/hpa-00-prepare"
        )
    # --fold: a kernel of its own per fold, with the notebook's FOLDS and FOLD set
    folder = kaggle.push("03_train", push_dir=tmp_path / "push", notebooks_dir=standin_notebooks, fold=(1, 3))
    metadata = json.loads((folder / "kernel-metadata.json").read_text())
    assert (metadata["id"], metadata["title"]) == ("alice/hpa-03-train-fold-1", "HPA 03 Train Fold 1")
    source = "".join(json.loads((folder / "03_train.ipynb").read_text())["cells"][injected]["source"])
    assert "FOLDS = 3" in source and "FOLD = 1" in source
    with pytest.raises(ValueError, match="--fold 3 --folds 3"):
        kaggle.push("03_train", push_dir=tmp_path / "push", notebooks_dir=standin_notebooks, fold=(3, 3))
    # --attach: the cell run beside the table's image run, by notebook name (the user's kernel) or OWNER/KERNEL
    folder = kaggle.push(
        "04_evaluate",
        push_dir=tmp_path / "push",
        notebooks_dir=standin_notebooks,
        attach=["07_cell_train", "bob/hpa-07-cell-train"],
    )
    assert json.loads((folder / "kernel-metadata.json").read_text())["kernel_sources"] == [
        "alice/hpa-03-train",
        "alice/hpa-07-cell-train",
        "bob/hpa-07-cell-train",
    ]
    # A version wherever a kernel is named (kaggle-cli 2.2.1+): after a bad version, resume from a good one
    folder = kaggle.push(
        "03_train",
        push_dir=tmp_path / "push",
        notebooks_dir=standin_notebooks,
        resume_from="alice/hpa-03-train/4",
        shards="alice/hpa-00-prepare/2",
        attach=["bob/hpa-07-cell-train/7"],
    )
    assert json.loads((folder / "kernel-metadata.json").read_text())["kernel_sources"] == [
        "alice/hpa-03-train/4",
        "alice/hpa-00-prepare/2",
        "bob/hpa-07-cell-train/7",
    ]
    source = "".join(json.loads((folder / "03_train.ipynb").read_text())["cells"][injected]["source"])
    assert "RESUME_FROM = 'alice/hpa-03-train/4'" in source and "SHARDS = 'alice/hpa-00-prepare/2'" in source
    for bad in ("alice/hpa-03-train/0", "alice/hpa-03-train/v4", "alice/hpa-03-train/4/1"):
        with pytest.raises(ValueError, match="takes OWNER/KERNEL or OWNER/KERNEL/VERSION"):
            kaggle.push("03_train", push_dir=tmp_path / "push", notebooks_dir=standin_notebooks, resume_from=bad)
    with pytest.raises(ValueError, match="--attach takes a notebook name, OWNER/KERNEL or OWNER/KERNEL/VERSION"):
        kaggle.push(
            "04_evaluate",
            push_dir=tmp_path / "push",
            notebooks_dir=standin_notebooks,
            attach=["bob/hpa-07-cell-train/latest"],
        )


def test_make_runs_the_notebooks_in_the_order_of_the_kaggle_chain():
    makefile = (kernels.REPO_ROOT / "Makefile").read_text()
    listed = re.search(r"^NOTEBOOKS := (.*)$", makefile, re.M).group(1).split()
    assert listed == list(chain.KERNELS) and sorted(listed) == kernels.notebook_names()
    for name, settings in chain.KERNELS.items():  # every kernel reads only kernels that run before it
        assert all(listed.index(source) < listed.index(name) for source in settings.kernel_sources)


def test_status_and_output_ask_the_cli_for_the_username(tmp_path, clean_home, fake_kaggle_cli, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_KAGGLE_CONFIG_USERNAME", "bob")  # what kaggle.json holds; only the CLI reads it
    assert kaggle.find_username(root_metadata_path=clean_home / "absent.json") == "bob"
    assert cli.main(["kaggle", "status", "04_evaluate"]) == 0
    assert json.loads(fake_kaggle_cli.read_text()) == ["kernels", "status", "bob/hpa-04-evaluate"]
    assert cli.main(["kaggle", "output", "--username", "carol", "--out", str(tmp_path / "got")]) == 0
    assert json.loads(fake_kaggle_cli.read_text()) == [
        "kernels",
        "output",
        "carol/hpa-03-train",
        "-p",
        str(tmp_path / "got"),
    ]


def test_hpacellseg_dataset_create_uploads_the_folder_through_the_cli(
    tmp_path, clean_home, fake_kaggle_cli, monkeypatch, capsys
):
    monkeypatch.setenv("FAKE_KAGGLE_CONFIG_USERNAME", "bob")
    for package, module in (("HPA-Cell-Segmentation/hpacellseg", "cellsegmentator.py"), ("zoo/pytorch_zoo", "unet.py")):
        (tmp_path / package).mkdir(parents=True)
        (tmp_path / package / module).write_text("")
    (tmp_path / "weights").mkdir()
    for name in ("dpn_unet_nuclei_v1.pth", "dpn_unet_cell_3ch_v1.pth"):
        (tmp_path / "weights" / name).write_bytes(b"weights")
    out = tmp_path / "offline"
    assert (
        cli.main(
            [
                "kaggle",
                "hpacellseg-dataset",
                "--package",
                str(tmp_path / "HPA-Cell-Segmentation"),
                "--fork",
                str(tmp_path / "zoo"),
                "--weights",
                str(tmp_path / "weights"),
                "--out",
                str(out),
                "--create",
            ]
        )
        == 0
    )
    assert json.loads(fake_kaggle_cli.read_text()) == ["datasets", "create", "-p", str(out)]
    assert json.loads((out / "dataset-metadata.json").read_text())["id"] == "bob/hpacellseg-offline"
    assert f"wrote {out}" in capsys.readouterr().out


def test_a_failing_cli_is_one_line_exit_2(clean_home, fake_kaggle_cli, monkeypatch, capsys):
    # e.g. no credentials: the CLI says how to add them, and exits non-zero
    monkeypatch.setenv("FAKE_KAGGLE_OUTPUT", "You must authenticate before you can call the Kaggle API.")
    monkeypatch.setenv("FAKE_KAGGLE_EXIT", "1")
    assert cli.main(["kaggle", "status", "--username", "alice"]) == 2
    out, err = capsys.readouterr()
    assert "You must authenticate" in out
    assert err.strip() == "error: `kaggle kernels status alice/hpa-03-train` failed with exit status 1"


def test_without_a_username_anywhere_the_error_says_how_to_give_one(clean_home, fake_kaggle_cli, monkeypatch):
    monkeypatch.setenv("KAGGLE_API_TOKEN", SECRETS["KAGGLE_API_TOKEN"])  # a token carries no username
    with pytest.raises(ValueError, match="--username"):
        kaggle.find_username(root_metadata_path=clean_home / "absent.json")


def test_missing_cli_is_one_line_exit_2(tmp_path, clean_home, monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", SECRETS["KAGGLE_KEY"])
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))  # no kaggle beside it
    monkeypatch.setattr(kaggle.importlib.util, "find_spec", lambda name: None)
    assert cli.main(["kaggle", "push", "03_train"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: the kaggle CLI is not installed: pip install kaggle (see requirements-dev.txt)"


def test_build_check_reports_stale_bundles(monkeypatch, capsys):
    monkeypatch.setattr(kernels, "stale_bundles", lambda: ["build/kaggle/03_train/03_train.ipynb is stale"])
    assert cli.main(["kaggle", "build", "--check"]) == 2
    assert "run `make kaggle`" in capsys.readouterr().err


# --- the Kaggle runtime (hpa_nb.core.env) --------------------------------------------------------
def test_kaggle_and_tpu_vm_detection():
    assert on_kaggle({"KAGGLE_KERNEL_RUN_TYPE": "Batch"}) and on_kaggle({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"})
    assert not on_kaggle({})
    assert on_tpu_vm({"ISTPUVM": "1"}) and not on_tpu_vm({"KAGGLE_KERNEL_RUN_TYPE": "Batch"})
    assert working_dir({"KAGGLE_KERNEL_RUN_TYPE": "Batch"}) == Path("/kaggle/working")
    assert working_dir({}) == Path("out")


def test_competition_data_found_under_nested_kaggle_mounts(tmp_path):
    input_root = tmp_path / "input"
    competition = input_root / "competitions" / COMPETITION
    decoy = input_root / "some-other-dataset"
    for folder in (competition / "train", decoy):
        folder.mkdir(parents=True)
    (competition / "train.csv").write_text("ID,Label\n")
    (decoy / "train.csv").write_text("ID,Label\n")
    assert find_competition_dir(input_root) == competition
    source = find_data({"KAGGLE_KERNEL_RUN_TYPE": "Batch"}, input_root=input_root)
    assert (source.kind, source.path) == ("kaggle", competition)
    assert find_competition_dir(tmp_path / "missing") is None


def test_select_backend_picks_jax_on_a_tpu_vm(monkeypatch):
    monkeypatch.delitem(sys.modules, "keras", raising=False)  # as in a fresh kernel
    environ = {"ISTPUVM": "1"}
    assert select_backend(environ) == "jax" and environ["KERAS_BACKEND"] == "jax"
    assert select_backend({"ISTPUVM": "1", "KERAS_BACKEND": "tensorflow"}) == "tensorflow"
    assert select_backend({}) == "tensorflow"


@pytest.mark.slow
def test_import_hpa_nb_makes_keras_use_jax_on_a_tpu_vm(tmp_path):
    environ = {key: value for key, value in os.environ.items() if key != "KERAS_BACKEND"}
    environ.update(ISTPUVM="1", PYTHONPATH=str(kernels.REPO_ROOT))
    completed = subprocess.run(
        [sys.executable, "-c", "import hpa_nb, keras; print(keras.backend.backend())"],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip().splitlines()[-1] == "jax"
