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
KAGGLE_ROOT = "/kaggle"  # moved by HPA_KAGGLE_ROOT, so that tests lay out a Kaggle session in a temporary folder
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
    return kaggle_working(environ) if on_kaggle(environ) else Path("out")


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


def find_competition_dir(input_root: Path | None = None, max_depth: int = 5) -> Path | None:
    """The folder holding train.csv under /kaggle/input, however deeply Kaggle mounted it.

    Kaggle has moved its mounts (``/kaggle/input/<slug>``, ``/kaggle/input/competitions/<slug>``),
    so search instead of hard-coding. A folder named after the competition wins over others.
    """
    found = search_folders(input_root or kaggle_input(), lambda _, files: "train.csv" in files, max_depth)
    if not found:
        return None
    return sorted(found, key=lambda path: (COMPETITION not in str(path), len(path.parts), str(path)))[0]


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


def source_record(root: str | Path) -> dict:
    """Where a data folder came from, in a form that survives a new mount (`resolve_source` reads it back):
    the synthetic sample (with its settings), the competition (by its slug), or a plain folder."""
    import json

    from hpa_nb.sample import MARKER  # the sample's settings

    root = Path(root)
    marker = root / MARKER
    if marker.is_file():
        return {"kind": "sample", "spec": json.loads(marker.read_text())}
    if COMPETITION in root.parts or is_under(root, kaggle_input()):
        return {"kind": "competition", "slug": COMPETITION}
    return {"kind": "folder"}


def is_under(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def resolve_source(record: Mapping | None, saved: str | None, environ: Mapping[str, str] = os.environ) -> Path:
    """The data folder `record` (`source_record`) describes, here: `saved` when it is still a folder, else the
    competition wherever this session mounts it, else the same sample generated again."""
    if saved and Path(saved).is_dir():
        return Path(saved)
    kind = (record or {}).get("kind")
    if kind == "competition":
        found = find_competition_dir(kaggle_input(environ)) if on_kaggle(environ) else None
        if found is None:
            raise FileNotFoundError(f"the run was trained on the competition data ({saved}), which is not attached "
                                    f"here: add {COMPETITION} as an input, or set DATA_DIR")
        return found
    if kind == "sample":
        spec = {key: record["spec"][key] for key in ("images", "size", "seed", "bit_depth", "test_images")}
        mounted = find_competition_dir(kaggle_input(environ)) if on_kaggle(environ) else None
        if mounted is not None and source_record(mounted) == record:  # the same sample, attached elsewhere
            return mounted
        return ensure_sample(spec, environ)
    raise FileNotFoundError(f"data folder {saved} of the run does not exist here: set DATA_DIR (--data) to it")


def find_data(environ: Mapping[str, str] = os.environ, input_root: Path | None = None) -> DataSource:
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
        input_root = input_root or kaggle_input(environ)
        found = find_competition_dir(input_root)
        if found is not None:
            return DataSource(found, "kaggle", f"train.csv found under {input_root}")
    sample = ensure_default_sample(environ)
    why = "no HPA_DATA_DIR and no competition data attached" if on_kaggle(environ) else "no HPA_DATA_DIR, not on Kaggle"
    return DataSource(sample, "sample", f"{why}: using the synthetic default sample")
