"""Writing files that matter safely: under a temporary name next to the target, then one rename.

A reader, a rerun or a crash in the middle of a write never finds half a file under the final
name: ``os.replace`` within one folder (one file system) is atomic, so the file there is either
the old one or the new one, whole.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# What `temporary_path` names look like: to clear away what a killed writer left behind.
TEMPORARY_GLOB = ".tmp-*"


def temporary_path(path: str | os.PathLike) -> Path:
    """A fresh hidden name next to `path` that ends in `path`'s own name, so it keeps its suffix.

    Nothing is created: the writer makes the file itself, so it gets the ordinary permissions
    (not mkstemp's owner-only 0600) and keeps them through the rename. The process ID and a
    random part keep writers apart, in one process or many, even on a shared folder.
    """
    path = Path(path)
    return path.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{path.name}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write instead of `path`; rename it over `path` when the block succeeds.

    The folder is created if needed. If the block raises (or is interrupted), the temporary file
    is removed and whatever was at `path` before stays untouched. The temporary name keeps the
    suffix, for writers that pick the format from it (``model.save(...keras)``, ``savefig``)::

        with atomic_path(folder / "history.png") as temporary:
            figure.savefig(temporary)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)  # after a successful rename there is nothing left to remove


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically and return the path."""
    path = Path(path)
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return path
