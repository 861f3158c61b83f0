"""What a kernel reads from the kernels before it, found where Kaggle mounts it.

On Kaggle each kernel runs in its own empty ``/kaggle/working``; the output of an earlier kernel is
mounted read-only under ``/kaggle/input``, at ``<slug>`` or deeper (``notebooks/<owner>/<slug>``).
Each artifact is recognised by the marker its owning module defines (`ARTIFACTS`), anywhere under
the input root, the producing kernel's slug preferred. A reference may still name a folder or
``OWNER/KERNEL``. On Kaggle a missing input stops the kernel before any work, in one line that
names what to attach; nothing here ever trains a substitute for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from hpa_nb.core import chain, env
from hpa_nb.data import shards, tiles
from hpa_nb.sample import sources
from hpa_nb.training import run


class MissingInputError(FileNotFoundError):
    """An input the kernel needs is not attached (or holds nothing); the message says what to attach."""


@dataclass(frozen=True)
class Artifact:
    """One kind of output that a later kernel reads."""

    what: str  # in words, e.g. "image run"
    producer: str  # the notebook whose kernel writes it (its slug is preferred when several are attached)
    parameter: str  # the notebook parameter that names it
    holds: Callable[[Path], bool]  # the owning module's marker: is this folder one?
    default: Callable[[], Path]  # off Kaggle, where it is when none is named

    def slug(self) -> str:
        return chain.kernel_slug(self.producer)


ARTIFACTS: dict[str, Artifact] = {
    "shards": Artifact("compact shards", "00_prepare", "SHARDS", shards.is_shard_folder, shards.default_dir),
    "image_run": Artifact(
        "image run", "03_train", "RUN_DIR", lambda folder: run.is_run(folder, "image"), run.default_dir
    ),
    "tiles": Artifact("cell tiles", "06_cells", "TILES_FROM", tiles.is_tile_folder, tiles.default_dir),
    "cell_run": Artifact(
        "cell run", "07_cell_train", "CELL_RUN_DIR", lambda folder: run.is_run(folder, "cell"), run.default_cell_dir
    ),
}


def _matches(holds: Callable[[Path], bool]) -> Callable[[Path, list[str]], bool]:
    return lambda folder, _: holds(folder)


def _named(reference: str | Path, match: Callable[[Path, list[str]], bool], root: Path) -> tuple[list[Path], str]:
    """The folders matching `match` in or below the folder `reference` names, or, for ``OWNER/KERNEL`` (or
    ``OWNER/KERNEL/VERSION``, or ``KERNEL``), below the folder Kaggle mounted that output at under `root`; and where that was, in words."""
    path = Path(reference).expanduser()
    if path.is_dir():
        return env.search_folders(path, match, 3), str(path)
    slug = chain.reference_slug(str(reference))
    mounts = env.search_folders(root, lambda folder, _: folder.name == slug, 4)
    return (
        [hit for mount in mounts for hit in env.search_folders(mount, match, 3)],
        f"the attached output {str(reference)!r} under {root}",
    )


def attach_hint(kind: str, consumer: str | None = None) -> str:
    """How to attach `kind` to the kernel `consumer`: the push command, or Kaggle's Add Input."""
    artifact = ARTIFACTS[kind]
    sources = chain.kernel_settings(consumer).kernel_sources if consumer else ()
    by_hand = f"Add Input → Notebooks → {artifact.slug()}"
    if consumer is None:
        return f"attach the output of {artifact.producer} ({by_hand})"
    flag = "" if artifact.producer in sources else f" --attach {artifact.producer}"
    return (
        f"attach the output of {artifact.producer}: python -m hpa_nb kaggle push {consumer}{flag} "
        f"(it attaches OWNER/{artifact.slug()}), or {by_hand}"
    )


def find(
    kind: str,
    reference: str | Path | None = None,
    *,
    consumer: str | None = None,
    required: bool = True,
    input_root: Path | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Path | None:
    """The folder of `kind` (a key of `ARTIFACTS`) a kernel reads.

    - `reference` a folder: the artifact in it or below (an error when there is none);
    - `reference` ``OWNER/KERNEL`` or ``KERNEL``: under the folder Kaggle mounted that output at;
    - no reference, on Kaggle: anywhere under the input root, the producer's slug first. Nothing found
      is a `MissingInputError` naming what to attach (None when not `required`);
    - no reference, elsewhere: the default place (``out/run`` …), or None when it holds none.
    """
    artifact = ARTIFACTS[kind]
    root = input_root or env.kaggle_input(environ)
    if reference:
        found, where = _named(reference, _matches(artifact.holds), root)
        if not found:
            raise MissingInputError(
                f"{artifact.parameter} {reference}: no {artifact.what} in {where}; " + attach_hint(kind, consumer)
            )
        return found[0]
    if not env.on_kaggle(environ):
        default = artifact.default()
        return default if artifact.holds(default) else None
    found = _attached(kind, root, consumer, required)
    return found[0] if found else None


def _attached(kind: str, root: Path, consumer: str | None, required: bool) -> list[Path]:
    """Every folder of `kind` attached under `root`, the producer's own output first; none found is a
    `MissingInputError` naming what to attach when `required`."""
    artifact = ARTIFACTS[kind]
    found = env.search_folders(root, _matches(artifact.holds), 6)
    found.sort(key=lambda path: artifact.slug() not in path.parts)  # stable: the producer's own output first
    if not found and required:
        raise MissingInputError(f"no {artifact.what} attached under {root}: " + attach_hint(kind, consumer))
    return found


def find_all(
    kind: str,
    references: str | Path | Sequence[str | Path] | None = None,
    *,
    consumer: str | None = None,
    required: bool = True,
    input_root: Path | None = None,
    environ: Mapping[str, str] = os.environ,
) -> list[Path]:
    """Every folder of `kind` a kernel reads, for an ensemble: each reference's (`find`), or with none given, on
    Kaggle every one attached (the producer's own first, then by path), elsewhere the default place's."""
    if isinstance(references, (str, Path)):
        references = [part for part in str(references).split(",") if part.strip()]
    if references:
        return [
            find(
                kind,
                reference.strip() if isinstance(reference, str) else reference,
                consumer=consumer,
                input_root=input_root,
                environ=environ,
            )
            for reference in references
        ]
    if not env.on_kaggle(environ):
        found = find(kind, None, consumer=consumer, required=required, input_root=input_root, environ=environ)
        return [] if found is None else [found]
    slug = ARTIFACTS[kind].slug()
    return sorted(
        _attached(kind, input_root or env.kaggle_input(environ), consumer, required),
        key=lambda path: (slug not in path.parts, str(path)),
    )


def previous_run(
    reference: str | Path, input_root: Path | None = None, environ: Mapping[str, str] = os.environ
) -> Path:
    """The run folder to resume that `reference` names: a folder, or ``OWNER/KERNEL`` attached as input.
    A run to resume needs its config and checkpoints (`run.is_resumable`), not a finished model."""
    found, where = _named(reference, _matches(run.is_resumable), input_root or env.kaggle_input(environ))
    if not found:
        raise MissingInputError(
            f"RESUME_FROM {reference}: no run folder ({run.CONFIG_FILE} and {run.CHECKPOINT_DIR}/) "
            f"in {where}; attach the earlier version as input "
            f"(python -m hpa_nb kaggle push NAME --resume-from OWNER/KERNEL[/VERSION])"
        )
    return found[0]


def run_data(run_dir: str | Path, explicit: str | Path | None = None) -> Path:
    """The data folder a run was trained on, found again here (`sources.resolve_source`): the saved folder when it
    is still there, else the competition wherever it is mounted now, or the same synthetic sample."""
    if explicit:
        return Path(explicit)
    info = run.load_info(run_dir)
    return sources.resolve_source(info.get("data_source"), info.get("data_dir"))
