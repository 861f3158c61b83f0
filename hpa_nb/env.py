"""Where the code runs (Kaggle, TPU VM, elsewhere) and where its data comes from."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

COMPETITION = "hpa-single-cell-image-classification"
KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_WORKING = Path("/kaggle/working")
IMAGE_FOLDERS = ("train", "test", "train_tfrecords")  # tens of thousands of files each: never walked

# The default sample: big enough for every class to show up and for a quick model to learn
# something, small enough to generate in seconds on 2 CPU cores.
DEFAULT_SAMPLE = {"images": 240, "size": 256, "seed": 0, "bit_depth": 8, "test_images": 16}
# Held-out images for comparing cell-level scorings: the default sample's 16 test images are too few
# (one image with a mitotic spindle, one spindle cell in it, moves the mAP by 0.04). These come from
# the same generator with another seed, so no model trained on the default sample has seen them.
EVALUATION_SAMPLE = {"images": 20, "size": 256, "seed": 1, "bit_depth": 8, "test_images": 400}


def on_kaggle(environ: Mapping[str, str] = os.environ) -> bool:
    """True inside a Kaggle kernel (interactive or batch)."""
    return bool(environ.get("KAGGLE_KERNEL_RUN_TYPE"))


def on_tpu_vm(environ: Mapping[str, str] = os.environ) -> bool:
    """True on a TPU VM such as Kaggle's TpuV5E8 (it sets ISTPUVM=1)."""
    return environ.get("ISTPUVM") == "1" or bool(environ.get("TPU_ACCELERATOR_TYPE"))


def tensorflow_sees_tpu() -> bool:
    """Whether this TensorFlow build can drive a TPU (only `tensorflow-tpu` can)."""
    return _installed("tensorflow-tpu")


def _installed(distribution: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

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
    return KAGGLE_WORKING if on_kaggle(environ) else Path("out")


def cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get("HPA_CACHE", Path.home() / ".cache" / "hpa_nb")).expanduser()


@dataclass(frozen=True)
class DataSource:
    """A data folder in the competition layout, and why it was chosen."""

    path: Path
    kind: str  # "HPA_DATA_DIR", "kaggle" or "sample"
    reason: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.path} ({self.reason})"


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


def find_competition_dir(input_root: Path = KAGGLE_INPUT, max_depth: int = 5) -> Path | None:
    """The folder holding train.csv under /kaggle/input, however deeply Kaggle mounted it.

    Kaggle has moved its mounts (``/kaggle/input/<slug>``, ``/kaggle/input/competitions/<slug>``),
    so search instead of hard-coding. A folder named after the competition wins over others.
    """
    found = search_folders(input_root, lambda _, files: "train.csv" in files, max_depth)
    if not found:
        return None
    return sorted(found, key=lambda path: (COMPETITION not in str(path), len(path.parts), str(path)))[0]


def find_shards(reference: str | Path | None = None, input_root: Path = KAGGLE_INPUT) -> Path | None:
    """A folder of compact shards (one holding ``manifest.json``): in the folder `reference` names,
    under the attached output ``OWNER/KERNEL`` (or ``KERNEL``) it names, or, with no reference,
    anywhere under /kaggle/input (None when there is none there).

    Kaggle mounts a kernel's output under its slug, at a depth that has changed over time, so the
    slug's folder is searched for. A named reference that holds no shards is an error.
    """
    from hpa_nb.shards import MANIFEST

    return _find_listed(reference, input_root, MANIFEST, "SHARDS", "compact shards",
                        "attach the prepare kernel's output (python -m hpa_nb kaggle push 03_train --shards OWNER/KERNEL)")


def find_tiles(reference: str | Path | None = None, input_root: Path = KAGGLE_INPUT) -> Path | None:
    """A folder of cell tiles (one holding ``tiles.json``), found as `find_shards` finds shards: so tiles
    written by one kernel (or uploaded as a dataset) reach another as its attached input."""
    from hpa_nb.tiles import MANIFEST

    return _find_listed(reference, input_root, MANIFEST, "TILES", "cell tiles",
                        "attach the output of the kernel that wrote them, or a dataset of them")


def _find_listed(reference: str | Path | None, input_root: Path, listing: str, option: str, what: str,
                 hint: str) -> Path | None:
    def has_listing(_: Path, files: list[str]) -> bool:
        return listing in files

    if reference is None:
        found = search_folders(input_root, has_listing)
        return found[0] if found else None
    path = Path(reference).expanduser()
    if path.is_dir():
        mounts = [path]
    else:
        slug = str(reference).rstrip("/").rpartition("/")[2]
        mounts = search_folders(input_root, lambda folder, _: folder.name == slug, 4)
    found = [folder for mount in mounts for folder in search_folders(mount, has_listing, 3)]
    if not found:
        raise FileNotFoundError(f"{option} {reference}: no {listing} of {what} in it or below; {hint}")
    return found[0]


def sample_dir(spec: Mapping[str, int], environ: Mapping[str, str] = os.environ) -> Path:
    """The cache folder of the sample `write_sample(**spec)` writes, named by its settings and the generator's version."""
    from hpa_nb.sample import GENERATOR_VERSION

    tests = "" if spec["test_images"] == DEFAULT_SAMPLE["test_images"] else f"-t{spec['test_images']}"
    name = (f"sample-v{GENERATOR_VERSION}-n{spec['images']}{tests}-s{spec['size']}-seed{spec['seed']}"
            f"-b{spec['bit_depth']}")
    return cache_dir(environ) / name


def ensure_sample(spec: Mapping[str, int], environ: Mapping[str, str] = os.environ) -> Path:
    """Generate the sample `spec` describes into the cache on first use, atomically, and return its folder."""
    target = sample_dir(spec, environ)
    if (target / "train.csv").is_file():
        return target
    from hpa_nb.sample import write_sample

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        write_sample(staging, **spec)
        try:
            staging.rename(target)
        except OSError:  # another process won the race: keep theirs
            if not (target / "train.csv").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def default_sample_dir(environ: Mapping[str, str] = os.environ) -> Path:
    return sample_dir(DEFAULT_SAMPLE, environ)


def ensure_default_sample(environ: Mapping[str, str] = os.environ) -> Path:
    """The default sample, generated into the cache on first use."""
    return ensure_sample(DEFAULT_SAMPLE, environ)


def ensure_evaluation_sample(environ: Mapping[str, str] = os.environ) -> Path:
    """`EVALUATION_SAMPLE` (400 held-out test images with their true cells), generated on first use."""
    return ensure_sample(EVALUATION_SAMPLE, environ)


def find_data(environ: Mapping[str, str] = os.environ, input_root: Path = KAGGLE_INPUT) -> DataSource:
    """The one data discovery every notebook and command uses.

    Order: ``HPA_DATA_DIR`` if set; else the competition data when on Kaggle; else the
    default sample, generated into ``HPA_CACHE`` (default ``~/.cache/hpa_nb``) on first use.
    """
    explicit = environ.get("HPA_DATA_DIR")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"HPA_DATA_DIR={explicit} is not a folder")
        return DataSource(path, "HPA_DATA_DIR", "set in the environment")
    if on_kaggle(environ):
        found = find_competition_dir(input_root)
        if found is not None:
            return DataSource(found, "kaggle", f"train.csv found under {input_root}")
    sample = ensure_default_sample(environ)
    why = "no HPA_DATA_DIR and no competition data attached" if on_kaggle(environ) else "no HPA_DATA_DIR, not on Kaggle"
    return DataSource(sample, "sample", f"{why}: using the synthetic default sample")
