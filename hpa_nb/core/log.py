"""The package's messages: every module logs to ``logging.getLogger(__name__)``, below the ``hpa_nb`` logger.

That logger has one handler of its own, set when the package is imported, so a notebook or a script shows the
package's lines with nothing to configure: each line as it is (``train: wrote …``, ``warning: …``), on standard
error as it is at that moment (a notebook's cell, pytest's capture). It does not pass them on to the root logger, so
a caller's own logging setup does not print them twice.

- **Quieter or louder.** ``hpa_nb.core.log.setup("quiet")`` keeps warnings only; ``"verbose"`` adds the debug lines;
  the command line's ``--quiet`` and ``--verbose`` do the same. ``logging.getLogger("hpa_nb.data")`` and its kin
  tune one stage folder.
- **Elsewhere.** ``setup(stream=…)`` writes them to another stream; removing the handler
  (``logging.getLogger("hpa_nb").handlers.clear()``) and setting ``propagate`` hands them to the caller's logging.
- **Not logged.** Progress bars stay tqdm's. The command line's one-line errors, a command's own result (the table
  or file it made) and what a function exists to show (``describe()``, the version line) are printed.
"""

from __future__ import annotations

import logging
import sys
from typing import IO

ROOT = "hpa_nb"
LEVELS = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}


class _Stream(logging.StreamHandler):
    """A handler writing to `target`, or, when none is given, to ``sys.stderr`` as it is when each line comes."""

    def __init__(self, target: IO[str] | None = None) -> None:
        self.target = target
        super().__init__(target)

    @property
    def stream(self) -> IO[str]:  # type: ignore[override]
        return self.target if self.target is not None else sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:  # StreamHandler.__init__ sets it; the property decides
        pass


def setup(level: str | int = "normal", stream: IO[str] | None = None) -> logging.Logger:
    """Give the ``hpa_nb`` logger its one handler (replacing the one set before) at `level` (`LEVELS`, or a
    `logging` level); returns that logger."""
    logger = logging.getLogger(ROOT)
    for handler in [each for each in logger.handlers if isinstance(each, _Stream)]:
        logger.removeHandler(handler)
    handler = _Stream(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(LEVELS[level] if isinstance(level, str) else level)
    logger.propagate = False
    return logger
