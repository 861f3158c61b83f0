"""Notebook views of cells: a segmentation drawn over the image, and per-cell predictions beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from scipy import ndimage

from hpa_nb.core.labels import COLORS, LABEL_NAMES
from hpa_nb.core.metrics import CellPredictions
from hpa_nb.data.crops import cell_ids_of
from hpa_nb.plots.figures import FIGURE_DPI, show_figures_inline
from hpa_nb.segmentation.classical import normalise
from hpa_nb.segmentation.images import image_folder, read_channels, read_mask


def composite(channels: Mapping[str, np.ndarray]) -> np.ndarray:
    """An RGB uint8 view of an HPA image: red + yellow as red/orange, green, blue nucleus."""
    red = normalise(channels["red"])
    yellow = normalise(channels["yellow"]) if "yellow" in channels else np.zeros_like(red)
    green = normalise(channels["green"]) if "green" in channels else np.zeros_like(red)
    blue = normalise(channels["blue"])
    rgb = np.stack([np.clip(red + yellow, 0, 1), np.clip(green + 0.5 * yellow, 0, 1), blue], axis=-1)
    return (rgb * 255).astype(np.uint8)


def overlay_cells(rgb: np.ndarray, mask: np.ndarray, color: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """The image with each cell's outline drawn on it (uint8 RGB)."""
    from skimage.segmentation import find_boundaries  # scikit-image: not on Kaggle's TPU image

    out = np.array(rgb, np.uint8, copy=True)
    edges = find_boundaries(mask, mode="inner")
    out[edges] = (np.asarray(color) * 255).astype(np.uint8)
    return out


def plot_cells(
    channels: Mapping[str, np.ndarray],
    mask: np.ndarray,
    predictions: CellPredictions | None = None,
    truth: np.ndarray | None = None,
    top: int = 2,
    ax=None,
    title: str = "",
):
    """Show an image with its cell outlines (white) and, if given, truth outlines (cyan) and each
    cell's ``top`` classes with their scores written at its centre. Returns the matplotlib Axes.
    """
    import matplotlib.pyplot as plt  # pyplot picks a GUI backend: only when drawing

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 6))
    view = composite(channels)
    if truth is not None:
        view = overlay_cells(view, truth, (0.0, 1.0, 1.0))
    ax.imshow(overlay_cells(view, mask))
    if predictions is not None and len(predictions.cell_ids):
        centres = ndimage.center_of_mass(np.ones(mask.shape), mask, predictions.cell_ids)
        for (row, col), scores in zip(centres, predictions.scores):
            best = np.argsort(-scores)[:top]
            text = "\n".join(f"{LABEL_NAMES[c][:14]} {scores[c]:.2f}" for c in best)
            ax.text(
                col,
                row,
                text,
                color="white",
                fontsize=7,
                ha="center",
                va="center",
                bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0},
            )
    ax.set_title(title or f"{len(cell_ids_of(mask))} cells")
    ax.axis("off")
    return ax


def overlay_figure(data_dir: Path, predictions: Mapping[str, CellPredictions], top: int = 2):
    """One column per image of ``predictions`` (`hpa_nb.cells.scoring.predict_images`): the cells found (white
    outlines; ground truth in cyan where the sample has masks) and, underneath, each cell's ``top``
    classes and confidences. Nothing is segmented or scored again.
    """

    show_figures_inline()
    figure = Figure(figsize=(5.0 * len(predictions), 10.0), layout="constrained", dpi=FIGURE_DPI)
    axes = figure.subplots(2, len(predictions), squeeze=False)
    for column, (image_id, cells) in enumerate(predictions.items()):
        pixels = read_channels(image_folder(data_dir, image_id), image_id)
        has_truth = (Path(data_dir) / "masks" / f"{image_id}.png").is_file()
        truth = read_mask(data_dir, image_id) if has_truth else None
        title = f"{image_id[:8]}: {len(cells.cell_ids)} cells found"
        if truth is not None:
            title += f", {len(cell_ids_of(truth))} true"
        plot_cells(pixels, cells.mask, truth=truth, ax=axes[0, column], title=title)
        plot_cells(pixels, cells.mask, cells, top=top, ax=axes[1, column], title="top classes per cell")
    return figure


def tile_gallery(crops: np.ndarray, info, truth: Mapping[str, str] | None = None, columns: int = 6):
    """Cell tiles (`hpa_nb.data.tiles.load_tiles`: uint8 ``[N, S, S, C]`` and their table) in a grid, each titled
    with its image, cell and weak label (the image's); with `truth` (tile key → label text, such as the
    sample's ``cells.csv``), also the cell's own label, in red where it lacks a class of the weak label."""

    show_figures_inline()
    rows = max(1, -(-len(crops) // columns))
    figure = Figure(figsize=(2.4 * columns, 2.9 * rows), layout="constrained", dpi=FIGURE_DPI)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    short = lambda text: ", ".join(LABEL_NAMES[int(c)][:12] for c in str(text).split("|"))  # noqa: E731
    for axis, crop, row in zip(axes, crops, info.itertuples()):
        channels = {color: crop[..., index].astype(np.float32) for index, color in enumerate(COLORS[: crop.shape[-1]])}
        axis.imshow(composite(channels))
        title, color = f"{row.image_id[:8]} cell {row.cell_id}\nweak: {short(row.label)}", "black"
        if truth is not None and row.key in truth:
            title += f"\ntrue: {short(truth[row.key])}"
            color = "black" if set(row.label.split("|")) <= set(truth[row.key].split("|")) else "firebrick"
        axis.set_title(title, fontsize=8, color=color)
    for axis in axes:
        axis.set_axis_off()
    return figure


def class_map_figure(views: Sequence, false_ones: int = 2) -> Figure:
    """Where an image model looks: per image (a `hpa_nb.cells.cam.ClassMapView`), the image, then the class map of
    each true class and of its `false_ones` strongest false ones over it, titled with the image-level probability
    (true classes in black, false ones in red)."""
    show_figures_inline()
    columns = 1 + max(len(view.classes(false_ones)) for view in views)
    figure = Figure(figsize=(2.6 * columns, 2.8 * len(views)), layout="constrained", dpi=FIGURE_DPI)
    axes = figure.subplots(len(views), columns, squeeze=False)
    for row, view in zip(axes, views):
        rgb = composite(view.channels)
        row[0].imshow(rgb)
        row[0].set_title(view.image_id[:12], fontsize=8)
        height, width = rgb.shape[:2]
        grid_h, grid_w = view.logit_map.shape[:2]
        for axis, c in zip(row[1:], view.classes(false_ones)):
            probabilities = 1.0 / (1.0 + np.exp(-np.clip(view.logit_map[..., c], -60, 60)))
            axis.imshow(rgb // 2)
            axis.imshow(
                probabilities,
                cmap="inferno",
                alpha=0.55,
                vmin=0.0,
                vmax=1.0,
                interpolation="bilinear",
                extent=(-0.5, width - 0.5, height - 0.5, -0.5),
            )
            axis.set_title(
                f"{LABEL_NAMES[c][:16]} {view.probabilities[c]:.2f}",
                fontsize=8,
                color="black" if c in view.truth else "firebrick",
            )
        for axis in row:
            axis.set_axis_off()
    figure.suptitle(
        f"class maps ({grid_h}×{grid_w} positions): true classes in black, strongest false ones in red", fontsize=9
    )
    return figure
