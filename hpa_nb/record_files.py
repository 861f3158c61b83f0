"""Restartable folders of numbered TFRecord files, the commit protocol that shards and tiles share.

A file is written under a temporary name; when it is whole, its JSON sidecar (what it holds and the
settings it was written with) is written next to its final name, and the rename into place is the
commit. So a file under its final name is whole and listed, a killed run leaves only temporary
files (removed on the next start), and a rerun skips what is finished.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from hpa_nb.files import TEMPORARY_GLOB, atomic_path, write_text


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def finished_files(out: Path, pattern: str, settings: dict, required: set[str]) -> dict[str, dict]:
    """The files of `out` matching `pattern` that earlier runs finished (name → sidecar).

    Leftovers of a killed run are removed. Finished files written with other `settings`, or by an
    older writer (a sidecar without the `required` keys), stop the run: mixing them would give a
    folder of two kinds.
    """
    for stale in out.glob(TEMPORARY_GLOB):
        stale.unlink()
    finished = {}
    for path in sorted(out.glob(pattern)):  # renamed after its sidecar, so every one has its listing
        record = json.loads(sidecar(path).read_text())
        if not required <= set(record):
            raise ValueError(f"{out} holds files written by an older hpa-nb ({sidecar(path).name} lacks "
                             f"{sorted(required - set(record))}): use another --out")
        mismatched = {key: record.get(key) for key, value in settings.items() if record.get(key) != value}
        if mismatched:
            raise ValueError(f"{out} already holds files with {mismatched}, not {settings}: use another --out")
        finished[path.name] = record
    for orphan in out.glob(pattern + ".json"):
        if not orphan.with_suffix("").is_file():  # killed between the sidecar and the rename: redo that file
            orphan.unlink()
    return finished


def commit(temporary: Path, final: Path, record: dict) -> dict:
    """Make the whole file `temporary` the finished `final`, listed by `record` (plus its size in bytes)."""
    record = {**record, "bytes": temporary.stat().st_size}
    write_text(sidecar(final), json.dumps(record))
    os.replace(temporary, final)  # the rename is the commit
    return record


def adopt(previous: str | Path, out: str | Path, pattern: str) -> int:
    """Copy the finished files of an earlier, stopped run (a read-only folder, such as the attached
    output of an earlier kernel) into `out`, so that the writer goes on from them.

    Each file is copied under a temporary name, its sidecar first, then renamed: a copy killed
    half-way leaves nothing that looks finished. Returns the number of files adopted."""
    previous, out = Path(previous), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    adopted = 0
    for path in sorted(previous.glob(pattern)):
        target = out / path.name
        if target.is_file() or not sidecar(path).is_file():
            continue
        write_text(sidecar(target), sidecar(path).read_text())
        with atomic_path(target) as temporary:
            shutil.copyfile(path, temporary)
        adopted += 1
    return adopted


def read_listing(path: Path, file_format: str, what: str) -> dict:
    """The JSON listing `path` of a finished folder (the shards' manifest, the tiles' listing), checked to be of
    `file_format`; a missing or broken one is an error naming it and saying it is no finished folder of `what`."""
    try:
        listing = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: not a finished folder of {what}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if listing.get("format") != file_format:
        raise ValueError(f"{path} is not a {file_format} listing")
    if not listing.get("count"):
        raise ValueError(f"{path} lists no records: an empty folder of {what} is no input")
    return listing
