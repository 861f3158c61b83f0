"""Saving and showing figures of every kind here (matplotlib, plotly, PIL) without importing plotly.

Kaggle's TPU image has matplotlib but not plotly, so the training kernel's figures are matplotlib
and this module must never need plotly; a plotly figure is recognised by its methods instead.
matplotlib figures are built without pyplot: they never open a window, need no display, and show
exactly once when a notebook cell returns them.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from hpa_nb.core.files import atomic_path

logger = logging.getLogger(__name__)

FIGURE_DPI = 80  # image grids: sharp enough on screen, small enough to commit
CHART_DPI = 90

_png_note_shown = False


class Chart(Figure):
    """A matplotlib figure of lines and bars: shown as PNG in a notebook (JPEG would smear its lines)."""


def chart(width: float, height: float) -> Chart:
    """An empty `Chart` of `width` × `height` inches, laid out to fit its labels."""
    show_figures_inline()
    return Chart(figsize=(width, height), layout="constrained", dpi=CHART_DPI)


def show_figures_inline() -> None:
    """Let a notebook show a returned matplotlib Figure as an image (called by every figure function).

    IPython registers its PNG formatter for Figures only once pyplot has loaded the inline
    backend, and these figures stay outside pyplot: register one here if nothing has yet.
    Image grids become JPEG (noisy microscopy panels compress ~10x better than PNG, which keeps
    committed notebooks small); a `Chart` becomes PNG only.
    """
    shell = sys.modules["IPython"].get_ipython() if "IPython" in sys.modules else None
    if shell is None:
        return
    formatters = shell.display_formatter.formatters
    if not any(Figure in formatters[kind].type_printers for kind in ("image/png", "image/jpeg")):
        from IPython.core.pylabtools import select_figure_formats  # IPython: only inside a notebook

        select_figure_formats(shell, {"jpeg"}, bbox_inches="tight", pil_kwargs={"quality": 85})
    if Chart not in formatters["image/png"].type_printers:
        from IPython.core.pylabtools import print_figure  # IPython: only inside a notebook

        formatters["image/png"].for_type(Chart, lambda figure: print_figure(figure, "png", bbox_inches="tight"))
        formatters["image/jpeg"].for_type(Chart, lambda figure: None)  # None: no JPEG copy of a chart


def _is_plotly(fig: Any) -> bool:
    return type(fig).__module__.startswith("plotly") and hasattr(fig, "write_html")


def _can_write_png() -> bool:
    try:
        import kaleido  # noqa: F401  (optional: PNGs of plotly charts)
    except ImportError:
        return False
    return True


def save_figure(fig: Any, path: str | os.PathLike, include_plotlyjs: bool | str = "cdn") -> list[Path]:
    """Save a figure next to `path` (its suffix is ignored) and return the files written.

    A plotly figure becomes ``.html`` (loading plotly.js from its CDN unless
    ``include_plotlyjs=True``, which embeds it for offline viewing: ~4 MB a file) and also
    ``.png`` when kaleido is installed; without kaleido the PNG is skipped with a one-time note.
    A matplotlib figure or a PIL image becomes ``.png``.
    """
    global _png_note_shown
    base = Path(path)
    base = base.with_suffix("") if base.suffix in {".html", ".png"} else base
    png = base.with_name(base.name + ".png")
    if _is_plotly(fig):
        html = base.with_name(base.name + ".html")
        with atomic_path(html) as temporary:
            fig.write_html(temporary, include_plotlyjs=include_plotlyjs)
        if not _can_write_png():
            if not _png_note_shown:
                logger.info("note: kaleido is not installed, so plotly figures are saved as HTML only")
                _png_note_shown = True
            return [html]
        with atomic_path(png) as temporary:  # kaleido picks the format from the suffix
            fig.write_image(temporary)
        return [html, png]
    if isinstance(fig, Figure):
        with atomic_path(png) as temporary:  # matplotlib, too, picks the format from the suffix
            fig.savefig(temporary, dpi=100, bbox_inches="tight")
    elif hasattr(fig, "save"):  # a PIL image, as visualkeras returns
        with atomic_path(png) as temporary:
            fig.save(temporary, format="PNG")
    else:
        raise TypeError(f"cannot save a {type(fig).__name__}; expected a plotly, matplotlib or PIL figure")
    return [png]


def saved(fig: Any, path: str | os.PathLike) -> Any:
    """Save `fig` with `save_figure` and return it, so one notebook line both keeps a plot and shows it."""
    save_figure(fig, path)
    return fig
