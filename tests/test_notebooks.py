"""The notebooks are jupytext pairs, each with one papermill `parameters` cell, committed with their outputs.

nbval itself runs the notebooks (``make test`` passes ``--nbval-lax notebooks``); these tests check the pairing.
"""

from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))


def _cells(notebook) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


def test_there_are_notebooks_to_check():
    names = [path.stem for path in SOURCES]
    assert names[:5] == ["00_prepare", "01_eda", "02_augmentation", "03_train", "04_evaluate"]


@pytest.mark.parametrize("source", SOURCES, ids=lambda path: path.stem)
def test_py_and_ipynb_are_in_sync(source: Path):
    paired = source.with_suffix(".ipynb")
    assert paired.is_file(), f"{paired.name} is missing: run `make notebooks`"
    from_py = jupytext.read(source)
    from_ipynb = jupytext.read(paired)
    assert _cells(from_py) == _cells(from_ipynb), f"{source.name} and {paired.name} differ: run `make notebooks`"


@pytest.mark.parametrize("source", SOURCES, ids=lambda path: path.stem)
def test_each_notebook_has_one_parameters_cell_first(source: Path):
    notebook = jupytext.read(source)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    tagged = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[0]
    assert "QUICK" in tagged[0].source


@pytest.mark.parametrize("source", SOURCES, ids=lambda path: path.stem)
def test_committed_notebooks_carry_outputs_and_a_story(source: Path):
    notebook = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.get("execution_count") for cell in code), "commit the executed notebook (make notebooks)"
    assert sum(bool(cell.outputs) for cell in code) >= len(code) // 2
    markdown = [cell.source for cell in notebook.cells if cell.cell_type == "markdown"]
    assert markdown[0].startswith("# ") and "In this notebook" in markdown[0]
    assert "What we have" in markdown[-1]
