"""The data every command falls back to: the competition where it is mounted, else a synthetic sample
generated into the cache on first use; and where a run's data came from, found again in a later session."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from hpa_nb.core.env import COMPETITION, cache_dir, find_competition_dir, is_under, kaggle_input, on_kaggle
from hpa_nb.sample import writer
from hpa_nb.sample.specs import DEFAULT_SAMPLE, EVALUATION_SAMPLE  # noqa: F401 (also read from here)


@dataclass(frozen=True)
class DataSource:
    """A data folder in the competition layout, and why it was chosen."""

    path: Path
    kind: str  # "HPA_DATA_DIR", "kaggle" or "sample"
    reason: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.path} ({self.reason})"


def sample_dir(spec: Mapping[str, int], environ: Mapping[str, str] = os.environ) -> Path:
    """The cache folder of the sample `write_sample(**spec)` writes, named by its settings and the generator's version."""
    tests = "" if spec["test_images"] == DEFAULT_SAMPLE["test_images"] else f"-t{spec['test_images']}"
    name = (
        f"sample-v{writer.GENERATOR_VERSION}-n{spec['images']}{tests}-s{spec['size']}-seed{spec['seed']}"
        f"-b{spec['bit_depth']}"
    )
    return cache_dir(environ) / name


def ensure_sample(spec: Mapping[str, int], environ: Mapping[str, str] = os.environ) -> Path:
    """Generate the sample `spec` describes into the cache on first use, atomically, and return its folder."""
    target = sample_dir(spec, environ)
    if (target / "train.csv").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        writer.write_sample(staging, **spec)
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
    root = Path(root)
    marker = root / writer.MARKER
    if marker.is_file():
        return {"kind": "sample", "spec": json.loads(marker.read_text())}
    if COMPETITION in root.parts or is_under(root, kaggle_input()):
        return {"kind": "competition", "slug": COMPETITION}
    return {"kind": "folder"}


def resolve_source(record: Mapping | None, saved: str | None, environ: Mapping[str, str] = os.environ) -> Path:
    """The data folder `record` (`source_record`) describes, here: `saved` when it is still a folder, else the
    competition wherever this session mounts it, else the same sample generated again."""
    if saved and Path(saved).is_dir():
        return Path(saved)
    kind = (record or {}).get("kind")
    if kind == "competition":
        found = find_competition_dir(kaggle_input(environ)) if on_kaggle(environ) else None
        if found is None:
            raise FileNotFoundError(
                f"the run was trained on the competition data ({saved}), which is not attached "
                f"here: add {COMPETITION} as an input, or set DATA_DIR"
            )
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
