"""Kaggle's TPU image as a package set, resolved again: the recipe's lines that bring what hpa-nb touches
(``.ci/kaggle-tpu-recipe.txt``) through pip's resolver for Python 3.12, written as a pinned requirements file with its
source and date, so the next refresh of the floating image is one command (``make tpu-image-set``)."""

from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from hpa_nb.core.files import write_text

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE = REPO_ROOT / ".ci" / "kaggle-tpu-recipe.txt"
# What hpa-nb touches on the image, in the order the package sets list them.
TOUCHED = (
    "tensorflow-cpu",
    "keras",
    "jax",
    "numpy",
    "pandas",
    "matplotlib",
    "pillow",
    "scipy",
    "scikit-learn",
    "opencv-python-headless",
    "h5py",
    "tqdm",
    "papermill",
    "ipykernel",
    "keras-hub",
    "tensorflow-text",
)
STAND_INS = {"jax": "jax[cpu]"}  # the image's jax[tpu], as it is installed here


def _name(text: str) -> str:
    return re.split(r"[\[<>=!~; ]", text.strip(), maxsplit=1)[0].lower().replace("_", "-")


def resolve(recipe: Path, python: str) -> dict[str, str]:
    """``{package: version}`` that pip's resolver picks for `recipe` with the interpreter `python` (the image's
    3.12), as if nothing were installed; nothing is installed."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        done = subprocess.run(
            [
                python,
                "-m",
                "pip",
                "install",
                "--dry-run",
                "--ignore-installed",
                "--quiet",
                "--disable-pip-version-check",
                "--report",
                str(report),
                "-r",
                str(recipe),
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.startswith("ERROR")] or done.stderr.splitlines()
            raise ValueError(f"pip could not resolve {recipe}: {(lines or ['no message'])[-1]}")
        installs = json.loads(report.read_text())["install"]
    return {_name(item["metadata"]["name"]): item["metadata"]["version"] for item in installs}


def write(
    recipe: Path, out: Path, python: str, touched: Sequence[str] = TOUCHED, today: datetime.date | None = None
) -> Path:
    """Resolve `recipe` (`resolve`) and write the pins of `touched` to `out`, headed by the recipe's own comment
    lines, the date and how it was made. A package of `touched` that the resolution lacks is named."""
    versions = resolve(recipe, python)
    missing = [name for name in touched if name not in versions]
    if missing:
        raise ValueError(f"the resolution of {recipe} holds no {missing[0]}: is it still in the recipe?")
    today = today or datetime.date.today()
    source = [line for line in recipe.read_text().splitlines() if line.startswith("#")]
    header = [
        f"# Kaggle's TPU v5e-8 notebook image, the recipe resolved on {today.isoformat()} for Python 3.12, for the",
        "# packages hpa-nb touches. Made by `python -m hpa_nb kaggle image-set` from the recipe below.",
        "#",
        *source,
        "#",
        "# Install: python3.12 -m venv VENV && VENV/bin/pip install -r THIS_FILE",
    ]
    pins = [f"{STAND_INS.get(name, name)}=={versions[name]}" for name in touched]
    return write_text(out, "\n".join(header + pins) + "\n")


def default_python() -> str:
    """The interpreter that resolves: this one when it is 3.12 (the image's), else pyenv's 3.12 where there is one."""
    if sys.version_info[:2] == (3, 12):
        return sys.executable
    found = subprocess.run(
        [
            "bash",
            "-c",
            'ls "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.12*/bin/python3.12 2>/dev/null | head -1',
        ],
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not found:
        raise FileNotFoundError("no Python 3.12 to resolve the image's set with: pass --python /path/to/python3.12")
    return found
