"""Restartable folders of numbered TFRecord files, the commit protocol that shards and tiles share.

A file is written under a temporary name; when it is whole, its JSON sidecar (what it holds and the
settings it was written with) is written next to its final name, and the rename into place is the
commit. So a file under its final name is whole and listed, a killed run leaves only temporary
files (removed on the next start), and a rerun skips what is finished.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import tensorflow as tf

from hpa_nb.core.budget import Probe
from hpa_nb.core.files import TEMPORARY_GLOB, atomic_path, temporary_path, write_text
from hpa_nb.data.reading import TFRECORD_OVERHEAD

logger = logging.getLogger(__name__)


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
            raise ValueError(
                f"{out} holds files written by an older hpa-nb ({sidecar(path).name} lacks "
                f"{sorted(required - set(record))}): use another --out"
            )
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
    logger.debug(f"records: finished {final} ({len(record.get('ids', ()))} images, {record['bytes']} bytes)")
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


class RollingWriter:
    """Writes one image's examples after another into numbered files ``{prefix}-{index:05d}.tfrec`` of `out`, and
    commits each file (`commit`) once it holds `images_per_file` images, or else `target_bytes`.

    Each file's listing gathers the values of every image's `entry` (e.g. its ID and label) under the same keys.
    After each committed file the disk is checked against the projection (`Probe.check`), and past `deadline` (a
    ``time.time()`` value) the writer stops: `add` returns False and `stopped_at_deadline` is set. Used as a
    context manager: leaving it normally commits the last file; leaving it on an error (or a kill) removes the
    unfinished temporary file, so nothing under a final name is ever partial.
    """

    def __init__(
        self,
        out: Path,
        prefix: str,
        settings: dict,
        finished: dict[str, dict],
        probe: Probe,
        images_per_file: int | None,
        target_bytes: int,
        deadline: float | None = None,
    ) -> None:
        self.out, self.prefix, self.settings, self.finished, self.probe = out, prefix, settings, finished, probe
        self.images_per_file, self.target_bytes, self.deadline = images_per_file, target_bytes, deadline
        self.index = max((int(name[len(prefix) + 1 : len(prefix) + 6]) + 1 for name in finished), default=0)
        self.done_bytes = sum(record["bytes"] for record in finished.values())  # by earlier runs
        self.images = self.bytes = 0  # written by this run
        self.stopped_at_deadline = False
        self._writer, self._temporary, self._listing, self._file_bytes = None, None, {}, 0

    def file_name(self, index: int) -> str:
        return f"{self.prefix}-{index:05d}.tfrec"

    def add(self, examples: list[bytes], entry: dict[str, Any]) -> bool:
        """Write one image's examples and list its `entry`; False once the deadline has stopped the writer."""
        if self._writer is None:  # created by the writer, so with ordinary permissions: the records are shared data
            self._temporary = temporary_path(self.out / self.file_name(self.index))
            self._writer = tf.io.TFRecordWriter(str(self._temporary))
        for example in examples:
            self._writer.write(example)
            self._file_bytes += len(example) + TFRECORD_OVERHEAD
            self.bytes += len(example) + TFRECORD_OVERHEAD
        for key, value in entry.items():
            self._listing.setdefault(key, []).append(value)
        self.images += 1
        self.probe.update(self.images, self.bytes, self.done_bytes)
        count = len(next(iter(self._listing.values())))
        if count == self.images_per_file or (self.images_per_file is None and self._file_bytes >= self.target_bytes):
            self._commit()
            self.probe.check(self.images, self.bytes, self.done_bytes)
            if self.deadline is not None and time.time() > self.deadline:
                self.stopped_at_deadline = True
        return not self.stopped_at_deadline

    def _commit(self) -> None:
        self._writer.close()
        final = self.out / self.file_name(self.index)
        self.finished[final.name] = commit(self._temporary, final, {**self.settings, **self._listing})
        self._writer, self._temporary, self._listing, self._file_bytes = None, None, {}, 0
        self.index += 1

    def __enter__(self) -> "RollingWriter":
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if self._writer is None:
            return
        if error_type is None:
            self._commit()
        else:  # interrupted: never leave a temporary file behind to look like data
            self._writer.close()
            self._temporary.unlink(missing_ok=True)


def finish(path: Path, listing: dict, stopped: str) -> dict:
    """Write a folder's listing (`path`) last, then say what it skipped and, where the deadline stopped the
    writer (`stopped` is then its line), how the next run goes on. Returns the listing."""
    write_text(path, json.dumps(listing, indent=1))
    if listing["skipped"]:
        logger.warning(f"warning: skipped {listing['skipped']} bad images or files (listed above)")
    if not listing["complete"]:
        logger.info(stopped)
    return listing
