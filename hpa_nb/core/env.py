"""Where the code runs: Kaggle (its input and working folders), a TPU VM or elsewhere; the Keras backend;
the cache; and finding folders under a mount without walking the competition's image folders."""

from __future__ import annotations

import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Mapping

COMPETITION = "hpa-single-cell-image-classification"
KAGGLE_ROOT = "/kaggle"  # moved by HPA_KAGGLE_ROOT, so that tests lay out a Kaggle session in a temporary folder
IMAGE_FOLDERS = ("train", "test", "train_tfrecords")  # tens of thousands of files each: never walked


def on_kaggle(environ: Mapping[str, str] = os.environ) -> bool:
    """True inside a Kaggle kernel (interactive or batch)."""
    return bool(environ.get("KAGGLE_KERNEL_RUN_TYPE"))


def kaggle_root(environ: Mapping[str, str] = os.environ) -> Path:
    """Where Kaggle mounts a session: ``/kaggle``, or ``HPA_KAGGLE_ROOT`` (a simulated session in tests)."""
    return Path(environ.get("HPA_KAGGLE_ROOT") or KAGGLE_ROOT)


def kaggle_input(environ: Mapping[str, str] = os.environ) -> Path:
    """The read-only inputs: the competition and the outputs of attached kernels and datasets."""
    return kaggle_root(environ) / "input"


def kaggle_working(environ: Mapping[str, str] = os.environ) -> Path:
    """The kernel's own output folder, empty when a version starts."""
    return kaggle_root(environ) / "working"


def on_tpu_vm(environ: Mapping[str, str] = os.environ) -> bool:
    """True on a TPU VM such as Kaggle's TpuV5E8 (it sets ISTPUVM=1)."""
    return environ.get("ISTPUVM") == "1" or bool(environ.get("TPU_ACCELERATOR_TYPE"))


def tensorflow_sees_tpu() -> bool:
    """Whether this TensorFlow build can drive a TPU (only `tensorflow-tpu` can)."""
    return _installed("tensorflow-tpu")


def _installed(distribution: str) -> bool:
    try:
        version(distribution)
        return True
    except PackageNotFoundError:
        return False


def select_backend(environ: "os._Environ[str] | dict[str, str]" = os.environ) -> str:
    """Choose the Keras backend before Keras is imported, and return it.

    An explicit ``KERAS_BACKEND`` always wins. On a TPU VM (Kaggle's v5e-8 sets ISTPUVM=1) use
    JAX whenever it is installed, even beside ``tensorflow-tpu``: Kaggle's image has JAX for the
    TPU and TensorFlow for the CPU only, and JAX is the path tested here. Otherwise TensorFlow.
    Once Keras is imported the choice is fixed, so this only reports it.
    """
    if "keras" in sys.modules and "KERAS_BACKEND" not in environ:
        return "tensorflow"
    if "KERAS_BACKEND" not in environ and on_tpu_vm(environ) and (_installed("jax") or not tensorflow_sees_tpu()):
        environ["KERAS_BACKEND"] = "jax"
    return environ.get("KERAS_BACKEND", "tensorflow")


def working_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where outputs go: ``HPA_OUT`` if set, else /kaggle/working on Kaggle, else ./out."""
    if environ.get("HPA_OUT"):
        return Path(environ["HPA_OUT"]).expanduser()
    return kaggle_working(environ) if on_kaggle(environ) else Path("out")


def cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get("HPA_CACHE", Path.home() / ".cache" / "hpa_nb")).expanduser()


def search_folders(root: Path, match: Callable[[Path, list[str]], bool], max_depth: int = 5) -> list[Path]:
    """Folders at or below `root` for which ``match(folder, file_names)`` holds, shallowest first;
    never below a match, nor into the competition's image folders (tens of thousands of files each)."""
    if not root.is_dir():
        return []
    found: list[Path] = []
    root_depth = len(root.parts)
    for folder, subfolders, files in os.walk(root, followlinks=True):
        depth = len(Path(folder).parts) - root_depth
        if match(Path(folder), files):
            found.append(Path(folder))
            subfolders.clear()
        elif depth >= max_depth:
            subfolders.clear()
        else:
            subfolders[:] = sorted(d for d in subfolders if d not in IMAGE_FOLDERS)
    return sorted(found, key=lambda path: (len(path.parts), str(path)))


def find_competition_dir(input_root: Path | None = None, max_depth: int = 5) -> Path | None:
    """The folder holding train.csv under /kaggle/input, however deeply Kaggle mounted it.

    Kaggle has moved its mounts (``/kaggle/input/<slug>``, ``/kaggle/input/competitions/<slug>``),
    so search instead of hard-coding. A folder named after the competition wins over others.
    """
    found = search_folders(input_root or kaggle_input(), lambda _, files: "train.csv" in files, max_depth)
    if not found:
        return None
    return sorted(found, key=lambda path: (COMPETITION not in str(path), len(path.parts), str(path)))[0]


def is_under(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False
