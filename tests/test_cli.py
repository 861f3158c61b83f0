"""The command line starts fast: `--help`, every verb's `--help` and the kaggle verbs that train nothing load no
TensorFlow, Keras or JAX (`hpa_nb.cli` imports a verb's handler only when the verb runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hpa_nb import cli
from hpa_nb.cells.rules import CROP_KINDS
from hpa_nb.commands import bench
from hpa_nb.data.crops import CROPS

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("tensorflow", "keras", "jax", "sklearn", "torch")


def _python(*arguments: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *arguments], env=environ, capture_output=True, text=True, timeout=120)


def test_help_imports_no_tensorflow():
    done = _python("-X", "importtime", "-m", "hpa_nb", "--help")
    assert done.returncode == 0 and "kaggle" in done.stdout
    loaded = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    assert "hpa_nb" in loaded and not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_every_verbs_help_and_the_light_kaggle_handler_import_no_framework():
    verbs = [action.dest for action in cli.build_parser()._subparsers._group_actions[0]._choices_actions]
    probe = f"""
import sys
from hpa_nb import cli
for words in {[[verb, "--help"] for verb in verbs] + [["kaggle", name, "--help"] for name in ("push", "status", "output", "chain")]!r}:
    try:
        cli.build_parser().parse_args(words)
    except SystemExit:
        pass
cli.handler("hpa_nb.commands.kaggle:main")  # push, status, output, chain: what those verbs run
print(sorted(name for name in sys.modules if name.split(".")[0] in {HEAVY!r}))
"""
    done = _python("-c", probe)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert len(verbs) == 10 and "usage: python -m hpa_nb kaggle chain" in done.stdout


def test_the_light_choices_are_the_heavy_tables_keys():
    assert set(CROP_KINDS) == set(CROPS)
    assert set(cli.BENCH_KINDS) == set(bench.BENCHES)
