"""Thin wrappers over the official `kaggle` CLI: push a notebook's bundle, follow it, fetch its output.

The CLI finds its own credentials (kaggle.json, KAGGLE_USERNAME/KAGGLE_KEY, KAGGLE_API_TOKEN, `kaggle auth
login`); nothing here reads them. Only the username is needed, to name the kernels.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from hpa_nb.core.chain import KERNEL_REFERENCE, kernel_slug
from hpa_nb.kaggle.kernels import (
    NOTEBOOKS_DIR,
    PLACEHOLDER_USERNAME,
    PUSH_DIR,
    ROOT_KERNEL,
    ROOT_METADATA,
    build_bundle,
    kernel_id,
    root_username,
)

# What the official CLI prints when Kaggle refuses a push, while it still exits 0 (kaggle 1.7–2.x).
PUSH_REFUSALS = (re.compile(r"Kernel push error.*"), re.compile(r"The following are not valid [\w ]+ sources.*"))
PUSHED = re.compile(r"Kernel version (\d+) successfully pushed")  # kaggle 1.7-2.x, on a push that Kaggle took


def kaggle_command(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The official kaggle CLI: on PATH, beside this Python, or as `python -m kaggle`."""
    on_path = shutil.which("kaggle", path=environ.get("PATH", os.defpath))
    if on_path:
        return [on_path]
    beside_python = Path(sys.executable).parent / "kaggle"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return [str(beside_python)]
    if importlib.util.find_spec("kaggle") is not None:
        return [sys.executable, "-m", "kaggle"]
    raise ValueError("the kaggle CLI is not installed: pip install kaggle (see requirements-dev.txt)")


def find_username(
    explicit: str | None = None, environ: Mapping[str, str] = os.environ, root_metadata_path: Path = ROOT_METADATA
) -> str:
    """The Kaggle username for kernel ids: --username, KAGGLE_USERNAME, the root kernel-metadata.json's
    owner, or what `kaggle config view` reports."""
    if explicit:
        return explicit
    if environ.get("KAGGLE_USERNAME"):
        return environ["KAGGLE_USERNAME"]
    owner = root_username(root_metadata_path)
    if owner != PLACEHOLDER_USERNAME:
        return owner
    shown = subprocess.run(
        [*kaggle_command(environ), "config", "view"], env=dict(environ), capture_output=True, text=True
    )
    found = re.search(r"^\W*username:\s*(\S+)\s*$", shown.stdout, re.M) if shown.returncode == 0 else None
    if found and found.group(1) != "None":
        return found.group(1)
    raise ValueError(
        "no Kaggle username: pass --username NAME or set KAGGLE_USERNAME (an access token does not carry one)"
    )


def run_kaggle(
    arguments: Sequence[str], environ: Mapping[str, str] = os.environ, refusals: Sequence[re.Pattern] = ()
) -> list[str]:
    """Run `kaggle <arguments>`, echoing its output as it comes.

    A non-zero exit status (no credentials, for one: the CLI says how to add them), or an output
    line matching one of `refusals`, becomes a one-line error.
    """
    command = kaggle_command(environ)
    print("$ kaggle " + " ".join(arguments), flush=True)
    process = subprocess.Popen(
        [*command, *arguments], env=dict(environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line.rstrip("\n"))
    if process.wait() != 0:
        raise ValueError(f"`kaggle {' '.join(arguments)}` failed with exit status {process.returncode}")
    for line in lines:
        if any(pattern.search(line) for pattern in refusals):
            raise ValueError(f"Kaggle refused `kaggle {' '.join(arguments)}`: {line.strip()}")
    return lines


def ask_kaggle(arguments: Sequence[str], environ: Mapping[str, str] = os.environ) -> tuple[int, str]:
    """`kaggle <arguments>` quietly: its exit status and what it printed (stdout and stderr together)."""
    done = subprocess.run(
        [*kaggle_command(environ), *arguments],
        env=dict(environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return done.returncode, done.stdout


def push(
    name: str = ROOT_KERNEL,
    username: str | None = None,
    environ: Mapping[str, str] = os.environ,
    push_dir: Path | None = None,
    notebooks_dir: Path | None = None,
    resume_from: str | None = None,
    shards: str | None = None,
    attach: Sequence[str] = (),
    fold: tuple[int, int] | None = None,
    **metadata_options: Any,
) -> Path:
    """Build ``name`` with the user's kernel id and send it with `kaggle kernels push -p`; returns the folder.

    ``resume_from`` ("OWNER/KERNEL", or "OWNER/KERNEL/VERSION" for one version; e.g. the same kernel, whose last version was stopped) attaches
    that kernel's output as input and sets the notebook's ``RESUME_FROM`` to continue its work
    (03_train: the run; 00_prepare: the shards). ``shards`` ("OWNER/KERNEL[/VERSION]" of 00_prepare) attaches
    its output and sets 03_train's ``SHARDS``, so training reads the compact shards. ``attach`` adds the output of
    more kernels: a notebook name ("07_cell_train": the user's own kernel of it) or "OWNER/KERNEL[/VERSION]"; the notebook
    finds each by its marker (`hpa_nb.training.inputs`). ``fold`` ``(k, K)`` (03_train) sets ``FOLD`` and ``FOLDS``
    and pushes a kernel of its own per fold (hpa-03-train-fold-k), so every fold's run can be attached at once.
    Exits with a one-line error when Kaggle refuses the push, which the CLI itself reports with
    exit status 0.
    """
    folder = bundle(
        name,
        username,
        environ,
        push_dir,
        notebooks_dir,
        resume_from=resume_from,
        shards=shards,
        attach=attach,
        fold=fold,
        **metadata_options,
    )
    send(folder, environ)
    return folder


def bundle(
    name: str,
    username: str | None = None,
    environ: Mapping[str, str] = os.environ,
    push_dir: Path | None = None,
    notebooks_dir: Path | None = None,
    resume_from: str | None = None,
    shards: str | None = None,
    attach: Sequence[str] = (),
    fold: tuple[int, int] | None = None,
    **metadata_options: Any,
) -> Path:
    """The push folder `push` sends (its options are `push`'s), built but not sent."""
    kaggle_command(environ)  # fail before building when the CLI is missing
    user = find_username(username, environ)
    parameters = {}
    for parameter, reference in (("RESUME_FROM", resume_from), ("SHARDS", shards)):
        if not reference:
            continue
        if not KERNEL_REFERENCE.fullmatch(reference):
            raise ValueError(
                f"--{parameter.lower().replace('_', '-')} takes OWNER/KERNEL or OWNER/KERNEL/VERSION "
                f"(e.g. alice/{kernel_slug(name)} or alice/{kernel_slug(name)}/3), got {reference!r}"
            )
        parameters[parameter] = reference
        metadata_options["kernel_sources"] = [*metadata_options.get("kernel_sources", ()), reference]
    for handle in metadata_options.get("model_sources", ()):
        check_model_source(handle)
    for source in attach:
        reference = source if "/" in source else kernel_id(source, user)
        if not KERNEL_REFERENCE.fullmatch(reference):
            raise ValueError(f"--attach takes a notebook name, OWNER/KERNEL or OWNER/KERNEL/VERSION, got {source!r}")
        metadata_options["kernel_sources"] = [*metadata_options.get("kernel_sources", ()), reference]
    if fold is not None:
        k, folds = fold
        if not 0 <= k < folds or folds < 2:
            raise ValueError(f"--fold {k} --folds {folds}: the fold must be one of 0..folds-1, with at least 2 folds")
        parameters.update(FOLDS=folds, FOLD=k)
        metadata_options["variant"] = f"Fold {k}"
    return build_bundle(
        name,
        push_dir or PUSH_DIR,
        user,
        notebooks_dir or NOTEBOOKS_DIR,
        parameters=parameters or None,
        **metadata_options,
    )


MODEL_PARTS = ("OWNER", "MODEL", "FRAMEWORK", "VARIATION", "VERSION")


def check_model_source(handle: str) -> None:
    """A Kaggle model source is OWNER/MODEL/FRAMEWORK/VARIATION/VERSION with a whole-number version (kaggle-cli's
    own rule); the push reports no bad model source, so a wrong one is refused here, naming the part."""
    example = "e.g. keras/resnetv1/keras/resnet_50_imagenet/3"
    parts = handle.split("/")
    if len(parts) != len(MODEL_PARTS):
        raise ValueError(
            f"--model {handle}: a Kaggle model source has {len(MODEL_PARTS)} parts, "
            f"{'/'.join(MODEL_PARTS)} ({example}), not {len(parts)}"
        )
    empty = [name for name, part in zip(MODEL_PARTS, parts) if not part.strip()]
    if empty:
        raise ValueError(f"--model {handle}: its {empty[0]} is empty ({'/'.join(MODEL_PARTS)}, {example})")
    if not parts[-1].isdigit():
        raise ValueError(f"--model {handle}: its VERSION {parts[-1]!r} is not a whole number ({example})")


def send(folder: Path, environ: Mapping[str, str] = os.environ) -> int | None:
    """`kaggle kernels push -p FOLDER`; the version number Kaggle gave it (None if the CLI did not say)."""
    lines = run_kaggle(["kernels", "push", "-p", str(folder)], environ, refusals=PUSH_REFUSALS)
    found = [PUSHED.search(line) for line in lines]
    return next((int(match.group(1)) for match in found if match), None)


def status(name: str = ROOT_KERNEL, username: str | None = None, environ: Mapping[str, str] = os.environ) -> None:
    """`kaggle kernels status USER/hpa-<name>`."""
    run_kaggle(["kernels", "status", kernel_id(name, find_username(username, environ))], environ)


def output(
    name: str = ROOT_KERNEL,
    out_dir: Path | None = None,
    username: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Path:
    """`kaggle kernels output USER/hpa-<name> -p OUT` (default out/kaggle/<name>); returns OUT."""
    out_dir = out_dir or Path("out") / "kaggle" / name
    slug = kernel_id(name, find_username(username, environ))
    out_dir.mkdir(parents=True, exist_ok=True)
    run_kaggle(["kernels", "output", slug, "-p", str(out_dir)], environ)
    return out_dir
