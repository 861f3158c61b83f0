"""Checks that run before a Kaggle session spends its time: the data, the accelerator, the library versions.

A TPU session can follow hours in a queue and counts against a 20-hour weekly quota, so a full
run that would train on the wrong data, or on a CPU, stops here before its first training step,
with one message that says what to fix. Each check has an explicit override for a user who
means it. Off Kaggle, and for quick runs, nothing is refused.
"""

from __future__ import annotations

import os
import platform
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Mapping

from hpa_nb.core.env import COMPETITION, on_kaggle, on_tpu_vm
from hpa_nb.sample.writer import MARKER

# The versions this project is tested with: the bounds of requirements.txt (a test keeps them
# equal), which admit what Kaggle's TPU image resolves today (its keras, jax and numpy float).
TESTED_VERSIONS: dict[str, tuple[str, str]] = {
    "python": ("3.11", "3.13"),
    "keras": ("3.5", "3.16"),
    "tensorflow": ("2.16", "2.22"),
    "jax": ("0.4.30", "0.13"),
    "numpy": ("1.26", "2.6"),
}
DISTRIBUTIONS = {
    "keras": ("keras",),
    "tensorflow": ("tensorflow-cpu", "tensorflow", "tensorflow-tpu"),
    "jax": ("jax",),
    "numpy": ("numpy",),
}


class PreflightError(ValueError):
    """A full Kaggle run that would waste the session; the CLI prints it as one line (exit status 2)."""


def is_synthetic(root: str | Path) -> bool:
    """Whether `root` is a data set written by `hpa_nb.sample.writer` (it holds the sample's marker file)."""
    return (Path(root) / MARKER).is_file()


def check_data(
    root: str | Path,
    quick: bool,
    allow_sample_data: bool = False,
    environ: Mapping[str, str] = os.environ,
    purpose: str = "train on",
) -> None:
    """On Kaggle, refuse a full run on the synthetic sample: the competition data is not attached."""
    if quick or allow_sample_data or not on_kaggle(environ) or not is_synthetic(root):
        return
    raise PreflightError(
        f"this full run would {purpose} the synthetic sample in {root}: the competition data is not attached. "
        f"Accept the rules on kaggle.com/competitions/{COMPETITION}, then add it with Add Input → Competitions "
        f"(a pushed kernel lists it in competition_sources), or set QUICK = True for a smoke run, or "
        f"ALLOW_SAMPLE_DATA = True (--allow-sample-data) to train on the sample on purpose"
    )


def _installed(distributions: tuple[str, ...]) -> str | None:
    """The version of the first of `distributions` that is installed (None: none is)."""
    for distribution in distributions:
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return None


def tpu_runtime_versions() -> str:
    """The installed jax, jaxlib and libtpu, in words: what decides whether JAX can drive a TPU."""
    found = {
        "jax": _installed(("jax",)),
        "jaxlib": _installed(("jaxlib",)),
        "libtpu": _installed(("libtpu", "libtpu-nightly")),
    }
    return ", ".join(f"{name} {version or 'not installed'}" for name, version in found.items())


def check_accelerator(
    device_kind: str, quick: bool, allow_cpu: bool = False, environ: Mapping[str, str] = os.environ
) -> None:
    """On a TPU VM, refuse any run whose JAX sees no TPU (a libtpu that does not suit the image's jax); on Kaggle,
    refuse a full run on a CPU: it cannot finish inside a session."""
    if on_tpu_vm(environ) and device_kind != "tpu" and not allow_cpu:
        raise PreflightError(
            f"this is a TPU VM, but JAX sees no TPU ({device_kind} only) with {tpu_runtime_versions()}: the image's "
            "libtpu does not suit its jax. Pin a matching pair in the notebook's first cell (pip install "
            "'jax[tpu]==VERSION', which brings its own libtpu, then restart), or set ALLOW_CPU = True (--allow-cpu) "
            "to run on the CPU on purpose"
        )
    if quick or allow_cpu or not on_kaggle(environ) or device_kind != "cpu":
        return
    raise PreflightError(
        "this full run found only a CPU, where it cannot finish inside a Kaggle session. Pick Settings → "
        "Accelerator → TPU v5e-8 (a pushed kernel asks with machine_shape TpuV5E8), or a GPU (push --accelerator "
        "NvidiaTeslaT4Highmem: T4 ×2, or NvidiaL4); Kaggle silently gives a CPU "
        "to accounts without identity verification (kaggle.com/settings → Phone verification). Or set "
        "QUICK = True for a smoke run, or ALLOW_CPU = True (--allow-cpu) to train on the CPU on purpose"
    )


def _version_key(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("."):
        digits = "".join(character for character in part if character.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def installed_versions() -> dict[str, str | None]:
    """Python's version and the installed version of keras, tensorflow, jax and numpy (None: not installed)."""
    return {
        "python": platform.python_version(),
        **{name: _installed(distributions) for name, distributions in DISTRIBUTIONS.items()},
    }


def untested(versions: Mapping[str, str | None]) -> list[str]:
    """One line per installed package whose version lies outside `TESTED_VERSIONS`."""
    lines = []
    for name, version in versions.items():
        if version is None or name not in TESTED_VERSIONS:
            continue
        low, high = TESTED_VERSIONS[name]
        if not _version_key(low) <= _version_key(version) < _version_key(high):
            lines.append(f"{name} {version} is outside the tested range >={low},<{high}")
    return lines


def report_versions(stream=None) -> dict[str, str | None]:
    """Print the versions on one line (to stdout, or `stream`) and warn per version outside the tested range."""
    versions = installed_versions()
    print(
        "versions: " + ", ".join(f"{name} {version or 'not installed'}" for name, version in versions.items()),
        file=stream or sys.stdout,
    )
    for line in untested(versions):
        warnings.warn(f"{line}: if something fails, compare with requirements.txt", stacklevel=2)
    return versions
