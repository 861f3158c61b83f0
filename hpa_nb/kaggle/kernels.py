"""Kaggle kernels: each notebook's kernel-metadata.json (from the table in `hpa_nb.core.chain`), and self-contained bundles.

A pushed notebook cannot ``import hpa_nb`` unless the package travels with it, so each bundle's
first code cell recreates the exact ``hpa_nb/**/*.py`` sources from an embedded archive. Bundles are
deterministic: the same notebook and sources always give the same bytes, so CI can tell a stale
committed bundle from a fresh one. Only the notebook and ``hpa_nb/**/*.py`` go in, never credentials.
"""

from __future__ import annotations

import base64
import copy
import functools
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from tqdm import tqdm

from hpa_nb.core.chain import MACHINES, kernel_settings, kernel_slug
from hpa_nb.core.env import COMPETITION
from hpa_nb.core.files import write_text

PLACEHOLDER_USERNAME = "USERNAME"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # hpa_nb/, whose kaggle/ this module is in
REPO_ROOT = PACKAGE_DIR.parent
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
BUILD_DIR = REPO_ROOT / "build" / "kaggle"
# Username-specific push folders: never committed (only build/kaggle/ is).
PUSH_DIR = REPO_ROOT / "build" / "kaggle-push"
ROOT_METADATA = REPO_ROOT / "kernel-metadata.json"
METADATA_FILE = "kernel-metadata.json"
ROOT_KERNEL = "03_train"  # the kernel a plain `kaggle kernels push` from the repository root sends
BOOTSTRAP_CELL_ID = "hpa-nb-bootstrap"
BOOTSTRAP_TAG = "hpa_nb-bootstrap"
ARCHIVE_MTIME = 0  # fixed so that the archive depends on file names and bytes only
DEFAULT_KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


# Kaggle's accelerator flags per machine shape (TpuV38/Tpu1VmV38 are retired: TpuV5E8 is the TPU). The machine
# shape decides the machine; the two flags say which kind it is.
ACCELERATOR_FLAGS: dict[str | None, dict[str, Any]] = {
    None: {"enable_gpu": False, "enable_tpu": False},
    **{
        shape: {"machine_shape": shape, "enable_gpu": kind == "gpu", "enable_tpu": kind == "tpu"}
        for shape, kind in MACHINES.items()
    },
}
DEFAULT = "default"  # `kernel_metadata(accelerator=)`: the table's machine for the kernel


def kernel_id(name: str, username: str = PLACEHOLDER_USERNAME) -> str:
    """The kernel's "owner/slug" reference."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", username):
        raise ValueError(f"invalid Kaggle username {username!r}")
    return f"{username}/{kernel_slug(name)}"


def kernel_metadata(
    name: str,
    username: str = PLACEHOLDER_USERNAME,
    *,
    code_file: str | None = None,
    enable_internet: bool | None = None,
    dataset_sources: Sequence[str] = (),
    model_sources: Sequence[str] = (),
    kernel_sources: Sequence[str] = (),
    variant: str = "",
    table_sources: bool = True,
    accelerator: str | None = DEFAULT,
) -> dict[str, Any]:
    """The kernel-metadata.json content for notebook ``name`` (pure: no files read).

    ``variant`` (e.g. "Fold 1") makes a kernel of its own beside the notebook's: its title and slug end in it
    ("HPA 03 Train Fold 1", hpa-03-train-fold-1), so each fold's output stays attachable beside the others.

    ``code_file`` defaults to ``<name>.ipynb`` beside the metadata. ``enable_internet`` overrides the
    table (False to run offline, with the ImageNet weights attached through ``dataset_sources`` or
    ``model_sources``). ``kernel_sources`` ("OWNER/KERNEL") come after the table's own, for example
    an earlier version of the kernel whose run to resume. There is deliberately no ``docker_image``:
    a pinned image can silently run a TPU kernel on the CPU image. ``table_sources=False`` leaves out the table's
    own sources, for a caller that names every one (the chain driver, which attaches fold kernels instead).
    ``accelerator`` names another machine than the table's (`hpa_nb.core.chain.MACHINES`), or None (or "none")
    for a CPU.
    """
    settings = kernel_settings(name)
    accelerator = settings.accelerator if accelerator == DEFAULT else None if accelerator == "none" else accelerator
    if accelerator not in ACCELERATOR_FLAGS:
        raise ValueError(f"unknown Kaggle accelerator {accelerator!r} for {name}: one of {', '.join(MACHINES)} or none")
    return {
        "id": kernel_id(f"{name} {variant}" if variant else name, username),
        "title": f"{settings.title} {variant}" if variant else settings.title,
        "code_file": code_file or f"{name}.ipynb",
        "language": "python",
        "kernel_type": "notebook",
        "is_private": True,
        **ACCELERATOR_FLAGS[accelerator],
        "enable_internet": settings.internet if enable_internet is None else enable_internet,
        "competition_sources": [COMPETITION],
        "dataset_sources": list(dataset_sources),
        "kernel_sources": [kernel_id(source, username) for source in settings.kernel_sources if table_sources]
        + list(kernel_sources),
        "model_sources": list(model_sources),
    }


def metadata_text(metadata: Mapping[str, Any]) -> str:
    return json.dumps(metadata, indent=2) + "\n"


# --- the embedded package -------------------------------------------------------------------
def package_files(package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """The files a bundle carries: every ``.py`` of the package and its stage folders, sorted by path, nothing else."""
    files = sorted(package_dir.rglob("*.py"), key=lambda path: path.relative_to(package_dir).as_posix())
    # only the package's own folders: each holds an __init__.py (a stray folder of scripts never travels)
    files = [
        path
        for path in files
        if (path.parent / "__init__.py").is_file() and len(path.relative_to(package_dir).parts) <= 2
    ]
    if not (package_dir / "__init__.py").is_file():
        raise FileNotFoundError(f"{package_dir} is not the hpa_nb package (no __init__.py)")
    return files


def package_tar(package_dir: Path = PACKAGE_DIR) -> bytes:
    """A deterministic, uncompressed tar of hpa_nb/**/*.py: fixed order, times, owners and modes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for path in package_files(package_dir):
            data = path.read_bytes()
            info = tarfile.TarInfo(f"hpa_nb/{path.relative_to(package_dir).as_posix()}")
            info.size, info.mtime, info.mode = len(data), ARCHIVE_MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def archive_members(archive_base64: str) -> dict[str, bytes]:
    """Decode an embedded archive back into {"hpa_nb/x.py": bytes}."""
    tar_bytes = lzma.decompress(base64.b64decode("".join(archive_base64.split())))
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as archive:
        return {member.name: archive.extractfile(member).read() for member in archive.getmembers() if member.isfile()}


# The cell's code runs on Kaggle, so it uses the standard library only and never imports Keras:
# `import hpa_nb` must still be the first thing to pick the Keras backend.
BOOTSTRAP_TEMPLATE = '''\
# hpa_nb bootstrap, generated by `python -m hpa_nb kaggle build`: do not edit.
# It recreates the exact hpa_nb package this notebook was built with (the repository's hpa_nb/**/*.py,
# embedded below as a base64 tar.xz) and puts it first on sys.path, so `import hpa_nb` works on
# Kaggle without pip or internet.
HPA_NB_SHA256 = "{sha256}"
HPA_NB_ARCHIVE = """
{archive}
"""


def _hpa_nb_bootstrap(archive_base64, expected_sha256):
    import base64, hashlib, importlib, io, lzma, os, shutil, sys, tarfile, tempfile
    from pathlib import Path

    tar_bytes = lzma.decompress(base64.b64decode("".join(archive_base64.split())))
    if hashlib.sha256(tar_bytes).hexdigest() != expected_sha256:
        raise RuntimeError("the embedded hpa_nb archive is corrupt: rebuild with `python -m hpa_nb kaggle build`")
    working = Path(os.environ.get("HPA_KAGGLE_ROOT") or "/kaggle") / "working"  # moved by tests only
    root = working / "hpa_nb_src" if working.is_dir() else Path(tempfile.mkdtemp(prefix="hpa_nb_src-"))
    shutil.rmtree(root / "hpa_nb", ignore_errors=True)  # no module left over from another version
    (root / "hpa_nb").mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as archive:
        for member in archive.getmembers():
            parts = member.name.split("/")  # hpa_nb/x.py or hpa_nb/<stage>/x.py, nothing else
            if not (member.isfile() and parts[0] == "hpa_nb" and len(parts) in (2, 3) and parts[-1].endswith(".py")
                    and all(part.isidentifier() for part in parts[1:-1] + [parts[-1][:-3]])):
                raise RuntimeError(f"unexpected entry in the hpa_nb archive: {{member.name}}")
            (root / member.name).parent.mkdir(exist_ok=True)
            (root / member.name).write_bytes(archive.extractfile(member).read())
    for module in [name for name in sys.modules if name == "hpa_nb" or name.startswith("hpa_nb.")]:
        del sys.modules[module]  # a re-run must import the embedded copy, not a stale one
    if str(root) in sys.path:
        sys.path.remove(str(root))
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    print(f"hpa_nb sources {{expected_sha256[:12]}} written to {{root}}")
    return root


HPA_NB_SRC = _hpa_nb_bootstrap(HPA_NB_ARCHIVE, HPA_NB_SHA256)
del _hpa_nb_bootstrap, HPA_NB_ARCHIVE'''


def bootstrap_source(package_dir: Path = PACKAGE_DIR) -> str:
    """The first code cell of every bundle: recreates hpa_nb from an embedded tar.xz."""
    return _bootstrap_cell(package_tar(package_dir))


@functools.lru_cache(maxsize=4)
def _bootstrap_cell(tar_bytes: bytes) -> str:
    """The bootstrap cell for one package content: xz at preset 9 is slow, and every bundle embeds the same."""
    # xz over the finished tar (not tarfile's "w:xz") keeps the tar bytes, and so the checksum,
    # independent of the compressor.
    compressed = lzma.compress(tar_bytes, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9)
    encoded = base64.b64encode(compressed).decode("ascii")
    lines = "\n".join(encoded[start : start + 100] for start in range(0, len(encoded), 100))
    return BOOTSTRAP_TEMPLATE.format(sha256=hashlib.sha256(tar_bytes).hexdigest(), archive=lines)


def bundle_notebook(
    notebook_py: Path, package_dir: Path = PACKAGE_DIR, parameters: Mapping[str, Any] | None = None
) -> str:
    """The self-contained .ipynb text of a jupytext py:percent notebook.

    The bootstrap cell goes right before the first code cell (after the header markdown), so it
    runs before any ``import hpa_nb``; every other cell is unchanged. `parameters` become an
    ``injected-parameters`` cell after the ``parameters`` cell, as papermill writes one (Kaggle
    runs a notebook as it is, so this is how a push sets them). Cell ids are set by position
    because jupytext draws random ones, which would make every build differ.
    """
    import jupytext  # notebook tooling: dev requirements only, not on Kaggle
    import nbformat

    if not notebook_py.is_file():
        raise FileNotFoundError(f"notebook {notebook_py} does not exist")
    notebook = jupytext.read(notebook_py, fmt="py:percent")
    bootstrap = nbformat.v4.new_code_cell(bootstrap_source(package_dir))
    bootstrap.metadata = {"tags": [BOOTSTRAP_TAG], "jupyter": {"source_hidden": True}}
    code_cells = [index for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"]
    first_code = code_cells[0] if code_cells else len(notebook.cells)
    notebook.cells.insert(first_code, bootstrap)
    if parameters:
        tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
        if not tagged:
            raise ValueError(f"{notebook_py.name} has no cell tagged parameters to set {', '.join(parameters)} after")
        unknown = [
            name
            for name in parameters
            if not re.search(rf"^{re.escape(name)}\s*=", notebook.cells[tagged[0]].source, re.M)
        ]
        if unknown:
            raise ValueError(f"{notebook_py.name} has no parameter {', '.join(unknown)}")
        injected = nbformat.v4.new_code_cell(
            "# Parameters set by `python -m hpa_nb kaggle push`\n"
            + "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
        )
        injected.metadata = {"tags": ["injected-parameters"]}
        notebook.cells.insert(tagged[0] + 1, injected)
    for index, cell in enumerate(notebook.cells):
        cell.id = BOOTSTRAP_CELL_ID if cell is bootstrap else f"cell-{index:03d}"
    # The bundle is not a jupytext pair (it must not be re-synced), and papermill needs a kernel.
    notebook.metadata.pop("jupytext", None)
    notebook.metadata.setdefault("kernelspec", dict(DEFAULT_KERNELSPEC))
    notebook.metadata.setdefault("language_info", {"name": "python"})
    notebook.nbformat, notebook.nbformat_minor = 4, 5
    nbformat.validate(notebook)
    return nbformat.writes(notebook) + "\n"


# --- building bundles -----------------------------------------------------------------------
def notebook_names(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[str]:
    """The notebooks that get a bundle: every notebooks/*.py, in order."""
    return sorted(path.stem for path in notebooks_dir.glob("*.py"))


def build_bundle(
    name: str,
    out_dir: Path = BUILD_DIR,
    username: str = PLACEHOLDER_USERNAME,
    notebooks_dir: Path = NOTEBOOKS_DIR,
    package_dir: Path = PACKAGE_DIR,
    parameters: Mapping[str, Any] | None = None,
    **metadata_options: Any,
) -> Path:
    """Write out_dir/<name>/{kernel-metadata.json, <name>.ipynb}, a folder `kaggle kernels push -p` accepts.

    The folder is replaced as a whole, so it never holds anything but those two files.
    """
    notebook_py = notebooks_dir / f"{name}.py"
    if not notebook_py.is_file():
        available = ", ".join(notebook_names(notebooks_dir)) or "none"
        raise FileNotFoundError(f"no notebook {notebook_py} (available: {available})")
    metadata = kernel_metadata(name, username, **metadata_options)
    notebook_text = bundle_notebook(notebook_py, package_dir, parameters)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir))
    try:
        (staging / metadata["code_file"]).write_text(notebook_text, encoding="utf-8")
        (staging / METADATA_FILE).write_text(metadata_text(metadata), encoding="utf-8")
        target = out_dir / name
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def root_metadata(
    username: str = PLACEHOLDER_USERNAME, build_dir: Path = BUILD_DIR, repo_root: Path = REPO_ROOT
) -> dict[str, Any]:
    """The repository root's kernel-metadata.json: the training kernel, pointing at its committed bundle."""
    code_file = (build_dir / ROOT_KERNEL / f"{ROOT_KERNEL}.ipynb").relative_to(repo_root).as_posix()
    return kernel_metadata(ROOT_KERNEL, username, code_file=code_file)


def root_username(path: Path = ROOT_METADATA) -> str:
    """The owner the user put in the root kernel-metadata.json (USERNAME until they set it)."""
    if not path.is_file():
        return PLACEHOLDER_USERNAME
    owner = str(json.loads(path.read_text(encoding="utf-8")).get("id", "")).partition("/")[0]
    return owner or PLACEHOLDER_USERNAME


def write_root_metadata(path: Path = ROOT_METADATA) -> Path:
    """Rewrite the root metadata from the table, keeping the owner the user set in it."""
    return write_text(path, metadata_text(root_metadata(root_username(path))))


def build_all(
    names: Sequence[str] | None = None,
    out_dir: Path = BUILD_DIR,
    notebooks_dir: Path = NOTEBOOKS_DIR,
    package_dir: Path = PACKAGE_DIR,
) -> list[Path]:
    """Build the committed (USERNAME) bundle of every notebook, or of ``names``."""
    names = list(names) if names else notebook_names(notebooks_dir)
    if not names:
        raise FileNotFoundError(f"no notebooks/*.py under {notebooks_dir}")
    return [
        build_bundle(name, out_dir, PLACEHOLDER_USERNAME, notebooks_dir, package_dir)
        for name in tqdm(names, desc="kaggle bundles", unit="notebook", disable=len(names) < 2)
    ]


# --- staleness ------------------------------------------------------------------------------
def bundle_fingerprint(notebook_text: str) -> tuple[str, dict[str, bytes]]:
    """A bundle's content with the compressed archive replaced by the files it holds.

    Comparing fingerprints instead of bytes keeps the staleness check independent of the xz
    library version; the checksum in the cell ties the archive to the files.
    """
    notebook = json.loads(notebook_text)
    cells = notebook.get("cells", [])
    bootstrap = next((cell for cell in cells if cell.get("id") == BOOTSTRAP_CELL_ID), None)
    if bootstrap is None:
        raise ValueError("not an hpa_nb bundle: no bootstrap cell")
    source = "".join(bootstrap["source"])
    match = re.search(r'HPA_NB_ARCHIVE = """(.*?)"""', source, flags=re.S)
    if match is None:
        raise ValueError("not an hpa_nb bundle: no embedded archive")
    members = archive_members(match.group(1))
    stripped = copy.deepcopy(notebook)
    for cell in stripped["cells"]:
        if cell.get("id") == BOOTSTRAP_CELL_ID:
            cell["source"] = source.replace(match.group(1), "")
    return json.dumps(stripped, sort_keys=True), members


def stale_bundles(
    build_dir: Path = BUILD_DIR,
    notebooks_dir: Path = NOTEBOOKS_DIR,
    package_dir: Path = PACKAGE_DIR,
    required: Sequence[str] = (ROOT_KERNEL,),
) -> list[str]:
    """One line per committed bundle that differs from a fresh build (empty when all are current).

    Bundles that exist are checked; a ``required`` one whose notebook exists must exist too.
    """
    problems = []
    with tempfile.TemporaryDirectory(prefix="hpa_nb-kaggle-") as fresh_root:
        for name in notebook_names(notebooks_dir):
            committed = build_dir / name
            if not committed.is_dir():
                if name in required:
                    problems.append(f"{committed} is missing")
                continue
            fresh = build_bundle(name, Path(fresh_root), PLACEHOLDER_USERNAME, notebooks_dir, package_dir)
            for file in sorted(path.name for path in fresh.iterdir()):
                old, new = committed / file, fresh / file
                if not old.is_file():
                    problems.append(f"{old} is missing")
                elif file.endswith(".ipynb"):
                    try:
                        same = bundle_fingerprint(old.read_text(encoding="utf-8")) == bundle_fingerprint(
                            new.read_text(encoding="utf-8")
                        )
                    except (ValueError, lzma.LZMAError, tarfile.TarError, json.JSONDecodeError):
                        same = False
                    if not same:
                        problems.append(f"{old} is stale against notebooks/{name}.py or hpa_nb/**/*.py")
                elif json.loads(old.read_text(encoding="utf-8")) != json.loads(new.read_text(encoding="utf-8")):
                    problems.append(f"{old} is stale")
            extra = sorted({path.name for path in committed.iterdir()} - {path.name for path in fresh.iterdir()})
            problems.extend(f"{committed / file} should not be in the bundle" for file in extra)
    return problems
