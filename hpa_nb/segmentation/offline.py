"""The offline HPA-Cell-Segmentation folder: everything `--segmentation hpacellseg` needs besides torch.

Kaggle's CPU/GPU image has torch, torchvision, opencv and imageio, but not the package (on GitHub only) nor
its ``pytorch_zoo`` fork, and a submission kernel runs with the internet off. So they travel as a Kaggle
dataset, which `build` lays out from the downloads::

    hpacellseg-offline/
      dataset-metadata.json
      hpacellseg-sources.zip   hpacellseg/ (code, VERSION, LICENSE) and pytorch_zoo/**/*.py
      nuclei-model.pth         the hosts' dpn_unet_nuclei_v1.pth
      cell-model.pth           the hosts' dpn_unet_cell_3ch_v1.pth

`find` finds the pieces in a folder or under /kaggle/input: this layout, the zip unpacked (Kaggle may
unpack archives), plain clones of the two repositories, and the weights under their Zenodo names.
`activate` unpacks the zip into the cache folder (the package reads its VERSION file from beside its
code, so it cannot run from inside a zip, and /kaggle/input is read-only) and puts the code on sys.path.
`resolve` is what the segmentation calls; `choose_segmentation` is the submission notebook's pick.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from hpa_nb.core import env
from hpa_nb.core.files import atomic_path, write_text
from hpa_nb.segmentation.hpacellseg import TWO_CHANNEL_NAMES, two_channel_error

SOURCES_ZIP = "hpacellseg-sources.zip"
NUCLEI_NAMES = ("nuclei-model.pth", "nuclei_model.pth", "dpn_unet_nuclei_v1.pth")
CELL_NAMES = ("cell-model.pth", "cell_model.pth", "dpn_unet_cell_3ch_v1.pth")
TWO_CHANNEL_FILES = tuple(stem + ".pth" for stem in TWO_CHANNEL_NAMES)
DATASET_SLUG = "hpacellseg-offline"
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed, so the same sources always give the same zip
RECIPE = (
    "see docs/kaggle.md, 'Offline on Kaggle, step by step' (python -m hpa_nb kaggle hpacellseg-dataset lays the "
    "folder out)"
)


@dataclass(frozen=True)
class OfflineSources:
    """Where the package's and the fork's sources (folders or the zip) and the two weight files are."""

    import_paths: tuple[Path, ...]
    nuclei_model: Path | None
    cell_model: Path | None
    two_channel_model: Path | None = None

    @property
    def complete(self) -> bool:
        return self.nuclei_model is not None and self.cell_model is not None

    def describe(self) -> str:
        code = ", ".join(str(p) for p in self.import_paths) or "the installed package"
        return f"weights {self.nuclei_model} and {self.cell_model}; code from {code}"


def _missing(sources: OfflineSources, name: int = 0) -> list[str]:
    """The weight files `sources` lacks, each by its `name`-th spelling (0: ours, -1: Zenodo's)."""
    return [
        names[name]
        for names, path in ((NUCLEI_NAMES, sources.nuclei_model), (CELL_NAMES, sources.cell_model))
        if path is None
    ]


def _first_file(root: Path, names: tuple[str, ...], max_depth: int) -> Path | None:
    found = env.search_folders(root, lambda _, files: any(name in files for name in names), max_depth)
    for folder in found:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def _source_roots(root: Path, max_depth: int) -> tuple[Path, ...]:
    """The folders to put on sys.path: the zip, or the folders holding ``hpacellseg/`` and ``pytorch_zoo/``."""
    zipped = _first_file(root, (SOURCES_ZIP,), max_depth)
    if zipped is not None:
        return (zipped,)
    roots = []
    for package, module in (("hpacellseg", "cellsegmentator.py"), ("pytorch_zoo", "unet.py")):
        found = env.search_folders(root, lambda folder, _, p=package, m=module: (folder / p / m).is_file(), max_depth)
        roots += found[:1]
    return tuple(dict.fromkeys(roots))


def find(root: Path, max_depth: int = 5) -> OfflineSources:
    """The pieces under `root` (each absent one is None, or left out of `import_paths`)."""
    root = Path(root)
    return OfflineSources(
        _source_roots(root, max_depth),
        _first_file(root, NUCLEI_NAMES, max_depth),
        _first_file(root, CELL_NAMES, max_depth),
        _first_file(root, TWO_CHANNEL_FILES, max_depth),
    )


def search_root(
    folder: str | Path | None = None, environ: Mapping[str, str] = os.environ, input_root: Path | None = None
) -> tuple[Path, int]:
    """Where to look, and how deep: `folder`, else $HPA_CELLSEG_DIR, else /kaggle/input on Kaggle, else the
    current folder (only its own files and subfolders: not a checkout's .venv)."""
    folder = folder or environ.get("HPA_CELLSEG_DIR")
    if folder:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"HPA-Cell-Segmentation folder {folder} not found: {RECIPE}")
        return Path(folder), 5
    return (input_root or env.kaggle_input(environ), 5) if env.on_kaggle(environ) else (Path("."), 1)


def _unpacked(archive: Path, environ: Mapping[str, str] = os.environ) -> Path:
    """The sources zip unpacked into the cache, once per content."""
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:12]
    target = env.cache_dir(environ) / f"hpacellseg-sources-{digest}"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        with zipfile.ZipFile(archive) as opened:
            opened.extractall(scratch)
        try:
            os.replace(scratch, target)
        except OSError:  # another process unpacked it first
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def activate(sources: OfflineSources, environ: Mapping[str, str] = os.environ) -> None:
    """Put the sources first on sys.path, so that ``import hpacellseg`` and the model files' unpickling of
    ``pytorch_zoo.unet`` find them."""
    for path in reversed(sources.import_paths):
        path = _unpacked(path, environ) if path.suffix == ".zip" else path
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    importlib.invalidate_caches()


def resolve(
    folder: str | Path | None = None, environ: Mapping[str, str] = os.environ, input_root: Path | None = None
) -> OfflineSources:
    """The pieces for a run, activated; a folder without both weight files is a one-line error."""
    root, depth = search_root(folder, environ, input_root)
    sources = find(root, depth)
    if not sources.complete:
        if sources.cell_model is None and sources.two_channel_model is not None:
            raise two_channel_error(sources.two_channel_model)
        raise FileNotFoundError(
            f"no {' and '.join(_missing(sources))} (or their Zenodo names) in {root.resolve()}: {RECIPE}"
        )
    activate(sources, environ)
    return sources


def choose_segmentation(environ: Mapping[str, str] = os.environ, input_root: Path | None = None) -> tuple[str, str]:
    """("hpacellseg", why) when torch and an offline folder are there, else ("classical", why not)."""
    if importlib.util.find_spec("torch") is None:
        return "classical", "classical segmentation (hpacellseg needs torch, which is not installed)"
    try:
        root, depth = search_root(None, environ, input_root)
    except FileNotFoundError as error:
        return "classical", f"classical segmentation ({error})"
    sources = find(root, depth)
    if not sources.complete or not sources.import_paths:
        return "classical", (f"classical segmentation (no complete HPA-Cell-Segmentation folder in {root}: {RECIPE})")
    return "hpacellseg", f"hpacellseg segmentation, the hosts' tool: {sources.describe()}"


def _package_folder(folder: Path, package: str, module: str, hint: str) -> Path:
    """`folder` if it is the package, else its child of that name."""
    for candidate in (folder, folder / package):
        if (candidate / module).is_file() and candidate.name == package:
            return candidate
    raise ValueError(f"{folder} holds no {package}/{module}: {hint}")


def _write_sources_zip(package: Path, fork: Path, target: Path) -> None:
    with atomic_path(target) as scratch, zipfile.ZipFile(scratch, "w", zipfile.ZIP_DEFLATED) as archive:
        for folder in (package, fork):
            for path in sorted(folder.rglob("*")):
                if (
                    path.is_file()
                    and (path.suffix == ".py" or path.name in ("VERSION", "LICENSE"))
                    and "__pycache__" not in path.parts
                ):
                    info = zipfile.ZipInfo(str(path.relative_to(folder.parent)), ZIP_TIME)
                    info.compress_type = zipfile.ZIP_DEFLATED
                    archive.writestr(info, path.read_bytes())
        for license_file in sorted(package.parent.glob("LICENSE*")):  # the package's licence, at its repository root
            info = zipfile.ZipInfo(f"hpacellseg/{license_file.name}", ZIP_TIME)
            archive.writestr(info, license_file.read_bytes())


def _place(source: Path, target: Path) -> None:
    """Hard-link `source` as `target` where possible (the weights are hundreds of MB), else copy it."""
    with atomic_path(target) as scratch:
        try:
            os.link(source, scratch)
        except OSError:
            shutil.copyfile(source, scratch)


def build(package_dir: Path, fork_dir: Path, weights_dir: Path, out: Path, username: str) -> Path:
    """Lay out the offline folder in `out` from a clone of HPA-Cell-Segmentation, a clone of its
    ``pytorch_zoo`` fork and a folder with the two published weight files; returns `out`."""
    package = _package_folder(
        Path(package_dir), "hpacellseg", "cellsegmentator.py", "clone github.com/CellProfiling/HPA-Cell-Segmentation"
    )
    if (Path(fork_dir) / "pytorch_zoo" / "__init__.py").is_file() and not (
        Path(fork_dir) / "pytorch_zoo" / "unet.py"
    ).is_file():
        raise ValueError(
            f"{fork_dir} is PyPI's pytorch-zoo (no pytorch_zoo/unet.py), not the fork hpacellseg needs: "
            "clone github.com/haoxusci/pytorch_zoo"
        )
    fork = _package_folder(Path(fork_dir), "pytorch_zoo", "unet.py", "clone github.com/haoxusci/pytorch_zoo")
    weights = find(Path(weights_dir), max_depth=1)
    if weights.cell_model is None and weights.two_channel_model is not None:
        raise two_channel_error(weights.two_channel_model)
    if not weights.complete:
        raise FileNotFoundError(
            f"{weights_dir} lacks {' and '.join(_missing(weights, -1))}: download it from zenodo.org/record/4665863"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_sources_zip(package, fork, out / SOURCES_ZIP)
    _place(weights.nuclei_model, out / NUCLEI_NAMES[0])
    _place(weights.cell_model, out / CELL_NAMES[0])
    metadata = {
        "title": "HPA-Cell-Segmentation offline",
        "id": f"{username}/{DATASET_SLUG}",
        "licenses": [{"name": "other"}],
    }
    write_text(out / "dataset-metadata.json", json.dumps(metadata, indent=2) + "\n")
    return out
