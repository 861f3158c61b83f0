"""The package logs instead of printing: one handler of its own, quieter or louder from the command line, and
`print` only where the output is the point (the exceptions that docs/development.md names)."""

from __future__ import annotations

import ast
import logging
import shutil
import sys
from pathlib import Path

import pandas as pd

from hpa_nb.core import log

REPO = Path(__file__).resolve().parents[1]
# Where a print stays, and why (docs/development.md, "Logging"): the command line's one-line errors and each
# command's result, bench's report, the chain driver's table (to the stream it is given), the official kaggle CLI's
# own output passed through, and the version line.
PRINTS = {"cli.py", "bench.py", "kaggle/chain.py", "kaggle/push.py", "training/preflight.py"}


def test_no_print_in_the_library_but_the_named_exceptions():
    printing = set()
    for path in (REPO / "hpa_nb").rglob("*.py"):
        calls = [
            node
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
        ]
        relative = path.relative_to(REPO / "hpa_nb").as_posix()
        if calls and not relative.startswith("commands/"):
            printing.add(relative)
    assert printing == PRINTS
    named = (REPO / "docs" / "development.md").read_text()
    assert all(f"hpa_nb/{name}" in named for name in PRINTS) and "hpa_nb/commands/" in named


def test_lines_reach_stderr_as_it_is_when_they_come_and_quiet_keeps_warnings(capsys):
    logger = logging.getLogger("hpa_nb.data.tiles")
    try:
        logger.info("tiles: an info line")
        logger.debug("tiles: a debug line")
        assert capsys.readouterr().err == "tiles: an info line\n"  # pytest's stderr, set after the import
        log.setup("quiet")
        logger.info("tiles: hidden")
        logger.warning("warning: shown")
        assert capsys.readouterr().err == "warning: shown\n"
        log.setup("verbose")
        logger.debug("tiles: a debug line")
        assert capsys.readouterr().err == "tiles: a debug line\n"
        root = logging.getLogger("hpa_nb")
        ours = [handler for handler in root.handlers if isinstance(handler, log._Stream)]  # pytest adds its own
        assert len(ours) == 1 and not root.propagate  # one handler, however often it is set
    finally:
        log.setup()


def test_quiet_and_verbose_from_the_command_line_before_or_after_the_verb(small_sample, tmp_path, cli):
    root = tmp_path / "data"
    shutil.copytree(small_sample, root, ignore=shutil.ignore_patterns("tiles", "shards"))
    first = pd.read_csv(root / "train.csv")["ID"][0]
    (root / "train" / f"{first}_blue.png").unlink()
    common = ("--src", root, "--size", "16", "--segmentation", "masks", "--workers", "1", "--skip-bad")
    loud = cli("tiles", *common, "--out", tmp_path / "a")
    assert loud.status == 0 and "images of" in loud.err and "skipped 1" in loud.err
    assert "records: finished" not in loud.err  # a debug line
    verbose = cli("tiles", *common, "--verbose", "--out", tmp_path / "v")
    assert verbose.status == 0 and "images of" in verbose.err and "records: finished" in verbose.err
    for where, arguments in {"after": ("tiles", *common, "-q"), "before": ("--quiet", "tiles", *common)}.items():
        quiet = cli(*arguments, "--out", tmp_path / where)
        assert quiet.status == 0, quiet.err[-2000:]
        assert "images of" not in quiet.err and "projection" not in quiet.err  # the info lines gone
        assert "warning: skipped bad input #1" in quiet.err and "skipped 1" in quiet.err  # warnings stay
        assert quiet.out.startswith("wrote ")  # the command's result is printed
    assert cli("tiles", *common, "-q", "-v", "--out", tmp_path / "b").status == 2  # one or the other
    assert sys.modules["hpa_nb.data.tiles"].logger.name == "hpa_nb.data.tiles"
