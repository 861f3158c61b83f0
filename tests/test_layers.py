"""The package's architecture, enforced: its stage folders, imports that flow one way, and imports at the top.

Read from the sources with `ast`, so nothing is imported. A module may import its own stage and the stages
below it (`STAGES`, lowest first), never one above, and no import circle is allowed, not even inside a stage.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hpa_nb"
STAGES = ("core", "segmentation", "data", "sample", "plots", "training", "cells", "kaggle")
ENTRY_POINTS = ("cli", "bench", "__main__", "commands")  # above every stage (commands/: the verbs' handlers)
# Imported inside the function that needs it: absent from one of Kaggle's images, or heavy and optional.
LOCAL_ONLY = (
    "torch",
    "plotly",
    "kaleido",
    "visualkeras",
    "hpacellseg",
    "skimage",
    "pycocotools",
    "IPython",
    "jax",
    "jupytext",
    "nbformat",
    "matplotlib.pyplot",
    "pytorch_zoo",
    "wandb",
    "kaggle_secrets",
    "keras_hub",
)


def module_name(path: Path, root: Path = PACKAGE.parent) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in path.parts}


def imported(path: Path, known: set[str]) -> list[tuple[ast.stmt, str]]:
    """(import statement, hpa_nb module it loads) for every import of the package in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from hpa_nb.data import tiles` loads hpa_nb.data.tiles; `from hpa_nb.data.tiles import X` loads tiles
            names = [
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                for alias in node.names
            ]
        else:
            continue
        found += [(node, name) for name in names if name == "hpa_nb" or name.startswith("hpa_nb.")]
    return found


def stage_of(name: str) -> int:
    """The floor of a module: 0..7 for the stages, above them for the entry points, -1 for the package itself."""
    parts = name.split(".")
    if len(parts) == 1:
        return -1
    if parts[1] in ENTRY_POINTS:
        return len(STAGES)
    return STAGES.index(parts[1])


def dispatched() -> set[str]:
    """The modules the command line imports on dispatch: each parser's ``handler="module:function"``."""
    found = set()
    for node in ast.walk(ast.parse((PACKAGE / "cli.py").read_text())):
        if isinstance(node, ast.keyword) and node.arg == "handler" and isinstance(node.value, ast.Constant):
            found.add(node.value.value.split(":")[0])
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    edges = {
        name: {target for _, target in imported(path, set(found)) if target != name} for name, path in found.items()
    }
    edges["hpa_nb.cli"] |= dispatched()  # the one seam: imported on dispatch, still an edge of the graph
    return edges


def test_the_command_line_is_the_one_place_that_imports_the_package_on_demand():
    """`hpa_nb.cli` names each verb's handler module and imports it with importlib when the verb runs; no other
    module of the package imports one of its own modules by name at run time, and every handler exists."""
    handlers = dispatched()
    assert handlers == {name for name in modules() if name.startswith("hpa_nb.commands.")} - {"hpa_nb.commands.common"}
    by_name = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module",
                "__import__",
            ):
                argument = ast.unparse(node.args[0]) if node.args else ""
                if name != "hpa_nb.cli" and ("hpa_nb" in argument or not argument.startswith(("'", '"'))):
                    by_name.append(f"{name}: {ast.unparse(node)}")
    known = {"hpa_nb.segmentation.hpacellseg: importlib.import_module(module)"}  # hpacellseg's own modules, by name
    assert set(by_name) <= known, "\n".join(sorted(set(by_name) - known))


def test_every_module_lives_in_a_stage_folder_with_a_docstring_saying_what_it_may_import():
    for name, path in modules().items():
        parts = name.split(".")
        if len(parts) == 2 and parts[1] not in STAGES:
            assert parts[1] in ENTRY_POINTS, f"{path}: a module at the top of the package, outside every stage"
        if len(parts) == 3:
            assert parts[1] in STAGES or parts[1] == "commands", f"{path}: {parts[1]}/ is not a stage folder"
    for index, stage in enumerate(STAGES):
        doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text()))
        assert doc and doc.startswith(f"Stage {index + 1}, {stage}:"), stage
        allowed = ", ".join(STAGES[:index]) or "nothing else of hpa_nb"
        assert f"May import: {allowed}" in doc, f"{stage}/__init__.py must say it may import: {allowed}"
        assert not any(
            isinstance(node, (ast.Import, ast.ImportFrom))
            for node in ast.parse((PACKAGE / stage / "__init__.py").read_text()).body
        ), f"{stage}/__init__.py imports: importing one module of a stage must not import the others"


def test_imports_never_climb_to_a_later_stage():
    upward = [
        f"{name} imports {target}"
        for name, targets in graph().items()
        for target in targets
        if stage_of(target) > max(stage_of(name), 0)
    ]
    assert not upward, "\n".join(sorted(upward))


def test_no_import_circle_not_even_inside_a_stage():
    edges, state, circles = graph(), {}, []

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(edges.get(name, ())):
            if state.get(target) == "open":
                circles.append(
                    " → ".join(path[path.index(target) :] + [name, target]) if target in path else f"{name} → {target}"
                )
            elif target not in state:
                visit(target, path + [name])
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [])
    assert not circles, "\n".join(circles)


def test_imports_are_at_the_top_except_heavy_optional_packages_each_with_its_reason():
    local, unexplained = [], []
    for path in modules().values():
        source = path.read_text()
        lines, tree = source.splitlines(), ast.parse(source)
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top:
                continue
            where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {ast.unparse(node)}"
            loaded = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if not all(any(item == lib or item.startswith(lib + ".") for lib in LOCAL_ONLY) for item in loaded):
                local.append(where)
            # the reason, in a comment on the line, or on the import line that opens its block
            row = node.lineno - 1
            while "#" not in lines[row] and row > 0 and lines[row - 1].strip().startswith(("import ", "from ")):
                row -= 1
            if "#" not in lines[row] and not (node.lineno > 1 and lines[node.lineno - 2].strip().startswith("#")):
                unexplained.append(where)
    assert not local, "function-local imports of light or own modules:\n" + "\n".join(local)
    assert not unexplained, "function-local imports without their reason:\n" + "\n".join(unexplained)


@pytest.mark.parametrize(
    "bad, expected",
    [
        ({"hpa_nb.data.tiles": {"hpa_nb.training.run"}}, "climb"),
        ({"hpa_nb.training.a": {"hpa_nb.training.b"}, "hpa_nb.training.b": {"hpa_nb.training.a"}}, "circle"),
    ],
)
def test_the_checks_catch_a_planted_violation(monkeypatch, bad, expected):
    """The two checks above fail on a graph with an upward import, or a circle inside one stage."""
    monkeypatch.setattr(f"{__name__}.graph", lambda: bad)
    check = (
        test_imports_never_climb_to_a_later_stage
        if expected == "climb"
        else test_no_import_circle_not_even_inside_a_stage
    )
    with pytest.raises(AssertionError):
        check()


@pytest.mark.slow
def test_pip_install_carries_every_stage(tmp_path):
    """``pip install .`` installs the package with all its stage folders: each imports from the installed copy."""
    source, target = tmp_path / "source", tmp_path / "site"  # a copy: the build leaves nothing in the checkout
    shutil.copytree(PACKAGE, source / "hpa_nb", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "requirements.txt", "README.md"):
        shutil.copy(PACKAGE.parent / name, source / name)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    installed = {module_name(path, target) for path in (target / "hpa_nb").rglob("*.py")}
    assert installed == set(modules())
    probe = (
        "import importlib, sys; sys.path.insert(0, sys.argv[1]); "
        f"names = {sorted(name for name in modules() if not name.endswith('__main__'))!r}; "
        "files = [importlib.import_module(name).__file__ for name in names]; "
        "print(all(file.startswith(sys.argv[1]) for file in files), len(files))"
    )
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    imported = subprocess.run(
        [sys.executable, "-c", probe, str(target)],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert imported.stdout.split()[-2:] == ["True", str(len(modules()) - 1)]
