"""hpa_nb.plots.figures: saving every kind of figure atomically, and showing charts and grids in a notebook."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from hpa_nb.plots import figures


def test_save_figure_writes_html_for_plotly_and_png_for_matplotlib_and_pil(tmp_path):
    go = pytest.importorskip("plotly.graph_objects")
    written = figures.save_figure(go.Figure(go.Bar(x=[1, 2], y=[3, 4])), tmp_path / "bars.html")
    assert tmp_path / "bars.html" in written and "Plotly" in (tmp_path / "bars.html").read_text()
    matplotlib_figure = Figure()
    matplotlib_figure.subplots().plot([0, 1], [1, 0])
    assert figures.save_figure(matplotlib_figure, tmp_path / "line") == [tmp_path / "line.png"]
    assert Image.open(tmp_path / "line.png").format == "PNG"
    assert figures.saved(Image.new("RGB", (4, 4)), tmp_path / "pil.png").size == (4, 4)
    assert Image.open(tmp_path / "pil.png").format == "PNG"
    assert not list(tmp_path.glob(".*")), "no temporary files left behind"
    with pytest.raises(TypeError, match="cannot save a list"):
        figures.save_figure([1, 2], tmp_path / "nothing")


def test_saving_a_matplotlib_figure_never_imports_plotly(tmp_path, monkeypatch):
    for name in [name for name in sys.modules if name.startswith("plotly")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "plotly", None)  # `import plotly` now raises ImportError
    figures.save_figure(figures.chart(2, 2), tmp_path / "chart")
    assert (tmp_path / "chart.png").is_file()


def test_charts_show_as_png_and_image_grids_as_jpeg_in_a_notebook():
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        line_chart = figures.chart(3, 2)
        line_chart.subplots().plot([0, 1], [0, 1])
        formatted, _ = shell.display_formatter.format(line_chart)
        assert "image/png" in formatted and "image/jpeg" not in formatted
        grid = Figure()
        grid.subplots().imshow(np.zeros((4, 4)))
        formatted, _ = shell.display_formatter.format(grid)
        assert "image/jpeg" in formatted and "image/png" not in formatted
    finally:
        InteractiveShell.clear_instance()
