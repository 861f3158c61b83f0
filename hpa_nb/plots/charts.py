"""Figures of the data and of evaluation: interactive plotly charts and matplotlib image grids.

Interactive charts are plotly ``go.Figure``s (saved as HTML; PNG too where kaleido is
installed): these notebooks run on Kaggle's CPU/GPU image, which has plotly. Image grids are
matplotlib ``Figure``s built without pyplot (see `hpa_nb.plots.figures`). The training figures, which
must work on the TPU image without plotly, are in `hpa_nb.plots.training`. Classes are always
shown by name, never by index.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure
from PIL import Image

from hpa_nb.core import metrics as metrics_module
from hpa_nb.core.labels import COLORS as CHANNEL_NAMES  # the stains; COLORS below are the plot's own trace colours
from hpa_nb.core.labels import LABEL_NAMES, N_CLASSES, multi_hot, names_of, parse_label
from hpa_nb.data.augment import STEPS, augment
from hpa_nb.plots.figures import FIGURE_DPI, show_figures_inline

TEMPLATE = "plotly_white"
COLORS = {"train": "#1f77b4", "val": "#ff7f0e", "auc": "#2ca02c", "ap": "#9467bd", "weight": "#d62728"}
# Each stain in its own colour, black for no signal: easier to read than greyscale side by side.
CHANNEL_COLORMAPS = {
    name: LinearSegmentedColormap.from_list(name, ["black", color])
    for name, color in zip(CHANNEL_NAMES, ("red", "lime", "blue", "yellow"))
}


if TYPE_CHECKING:
    import plotly.graph_objects as go  # for the annotations only


def _plotly():
    """plotly's graph objects, imported when a chart is drawn (Kaggle's TPU image lacks plotly, and the evaluation
    and the CLI that import this module must load there). Notebooks get plotly.js from its CDN, not 4 MB embedded
    in every committed notebook."""
    import plotly.graph_objects as go  # plotly: not on Kaggle's TPU image
    import plotly.io as pio

    parts = pio.renderers.default.split("+")
    if "notebook" in parts:
        pio.renderers.default = "+".join("notebook_connected" if part == "notebook" else part for part in parts)
    return go


def _styled(
    fig: go.Figure, title: str, x_title: str | None = None, y_title: str | None = None, height: int = 450
) -> go.Figure:
    """The one look every plotly figure here shares."""
    fig.update_layout(
        template=TEMPLATE,
        title=dict(text=title, x=0.01),
        height=height,
        margin=dict(l=60, r=30, t=70, b=60),
        hoverlabel=dict(namelength=-1),
    )
    if x_title is not None:
        fig.update_xaxes(title_text=x_title)
    if y_title is not None:
        fig.update_yaxes(title_text=y_title)
    return fig


# --- the data -------------------------------------------------------------------------------
def labels_per_image(labels: np.ndarray) -> go.Figure:
    """How many images carry 1, 2, 3, ... labels."""
    go = _plotly()
    per_image = multi_hot(labels).sum(axis=1).astype(int)
    values, counts = np.unique(per_image, return_counts=True)
    fig = go.Figure(
        go.Bar(
            x=values,
            y=counts,
            marker_color=COLORS["train"],
            text=counts,
            textposition="outside",
            hovertemplate="%{y} images with %{x} labels<extra></extra>",
        )
    )
    fig.update_xaxes(dtick=1)
    return _styled(fig, "Labels per image", "labels on the image", "images", height=380)


def label_cooccurrence(labels: np.ndarray, normalize: bool = False) -> go.Figure:
    """Images sharing each pair of labels (diagonal: images with the label).

    With ``normalize=True`` each row is divided by its diagonal: the cell (row A, column B)
    is then the fraction of A's images that also carry B.
    """
    go = _plotly()
    matrix = multi_hot(labels)
    together = matrix.T @ matrix
    counts = np.diag(together)
    values = together / np.maximum(counts[:, None], 1) if normalize else together
    hover = [
        [
            f"{LABEL_NAMES[row]} & {LABEL_NAMES[col]}: {int(together[row, col])} images"
            + (f" ({values[row, col]:.0%} of {LABEL_NAMES[row]})" if normalize else "")
            for col in range(N_CLASSES)
        ]
        for row in range(N_CLASSES)
    ]
    fig = go.Figure(
        go.Heatmap(
            z=values,
            x=list(LABEL_NAMES),
            y=list(LABEL_NAMES),
            text=hover,
            hoverinfo="text",
            colorscale="Blues",
            colorbar=dict(title="fraction" if normalize else "images"),
        )
    )
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(tickangle=-45)
    title = "Label co-occurrence" + (" (row-normalised: P(column | row))" if normalize else " (images)")
    return _styled(fig, title, height=720)


def image_properties(
    root: str | os.PathLike, ids: Iterable[str], folder: str = "train", channel: str = "red"
) -> pd.DataFrame:
    """Width, height and bit depth of each image, read from one channel's PNG header (no pixel decoding)."""
    rows = []
    for image_id in ids:
        path = Path(root) / folder / f"{image_id}_{channel}.png"
        if not path.is_file():
            raise FileNotFoundError(f"image {image_id}: {path} does not exist")
        with Image.open(path) as image:
            # Pillow opens 16-bit greyscale PNGs as "I;16" (or "I"), 8-bit ones as "L".
            bit_depth = 16 if image.mode.startswith("I") else 1 if image.mode == "1" else 8
            rows.append(
                {
                    "ID": image_id,
                    "width": image.width,
                    "height": image.height,
                    "bit_depth": bit_depth,
                    "mode": image.mode,
                }
            )
    return pd.DataFrame(rows, columns=["ID", "width", "height", "bit_depth", "mode"])


def image_sizes(properties: pd.DataFrame) -> go.Figure:
    """Images per size and bit depth, from `image_properties`."""
    go = _plotly()
    groups = (
        properties.assign(size=properties["width"].astype(str) + "×" + properties["height"].astype(str))
        .groupby(["size", "bit_depth"])
        .size()
        .reset_index(name="images")
    )
    fig = go.Figure()
    for bit_depth, frame in groups.groupby("bit_depth"):
        fig.add_trace(
            go.Bar(
                x=frame["size"],
                y=frame["images"],
                name=f"{bit_depth}-bit",
                hovertemplate="%{x} px, " + f"{bit_depth}-bit: " + "%{y} images<extra></extra>",
            )
        )
    fig.update_layout(barmode="group")
    return _styled(
        fig, f"Image sizes and bit depths ({len(properties)} images)", "width × height (px)", "images", height=380
    )


# --- evaluation -----------------------------------------------------------------------------
def per_class_scores(metrics: Mapping[str, Any]) -> go.Figure:
    """ROC AUC and average precision per class, from `hpa_nb.core.metrics.image_metrics` (or metrics.json).

    Classes absent from the evaluated images have no bar and are marked "absent".
    """
    go = _plotly()
    classes = metrics["classes"]
    names = [entry["name"] for entry in classes]
    fig = go.Figure()
    for key, label, color in (("roc_auc", "ROC AUC", COLORS["auc"]), ("average_precision", "AP", COLORS["ap"])):
        values = [np.nan if entry[key] is None else entry[key] for entry in classes]
        fig.add_trace(
            go.Bar(
                y=names,
                x=values,
                name=label,
                orientation="h",
                marker_color=color,
                customdata=[
                    [entry["support"], "n/a" if entry["f1"] is None else f"{entry['f1']:.3f}"] for entry in classes
                ],
                hovertemplate="%{y}<br>" + label + " %{x:.3f}<br>support %{customdata[0]}, F1 %{customdata[1]}"
                "<extra></extra>",
            )
        )
    for entry in classes:
        if entry["roc_auc"] is None and entry["average_precision"] is None:
            fig.add_annotation(
                y=entry["name"], x=0.02, text="absent", showarrow=False, xanchor="left", font=dict(color="grey")
            )
    fig.add_vline(x=0.5, line_dash="dot", line_color="grey", annotation_text="chance AUC", annotation_position="top")
    fig.update_layout(barmode="group", bargap=0.25)
    fig.update_xaxes(range=[0, 1.02])
    fig.update_yaxes(autorange="reversed")

    def shown(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    title = f"Per-class scores (macro AUC {shown(metrics['macro_roc_auc'])}, mAP {shown(metrics['map'])})"
    return _styled(fig, title, "score", None, height=160 + 32 * len(classes))


def precision_recall_curves(
    y_true: np.ndarray, y_score: np.ndarray, class_names: Sequence[str] = LABEL_NAMES
) -> go.Figure:
    """One precision–recall curve per class present (legend: its AP), plus the micro-average."""
    go = _plotly()
    truth = np.asarray(y_true)
    score = np.asarray(y_score, np.float64)
    fig = go.Figure()
    curves = [(name, truth[:, index], score[:, index]) for index, name in enumerate(class_names)]
    curves.append(("micro-average", truth.ravel(), score.ravel()))
    for name, column_truth, column_score in curves:
        if not np.any(column_truth):
            continue  # no positive: no curve
        precision, recall, thresholds = metrics_module.precision_recall_curve(column_truth, column_score)
        average = metrics_module.average_precision(column_truth, column_score)
        micro = name == "micro-average"
        fig.add_trace(
            go.Scatter(
                x=recall,
                y=precision,
                name=f"{name} (AP {average:.2f})",
                mode="lines",
                line_shape="hv",
                line=dict(color="black", dash="dash", width=3) if micro else dict(width=1.5),
                customdata=np.r_[thresholds, np.nan],
                hovertemplate=name + "<br>recall %{x:.2f}, precision %{y:.2f}<br>threshold %{customdata:.3f}"
                "<extra></extra>",
            )
        )
    fig.update_xaxes(range=[0, 1.02])
    fig.update_yaxes(range=[0, 1.05])
    return _styled(fig, "Precision–recall curves", "recall", "precision", height=560)


# --- image grids (matplotlib) ---------------------------------------------------------------
def _display_scaled(channel: np.ndarray, stretch: bool) -> np.ndarray:
    """Map a 0–255 channel to 0–1; with `stretch`, its 99.5th percentile becomes 1 (dim stains become visible)."""
    top = np.percentile(channel, 99.5) if stretch else 255.0
    return np.clip(channel / max(float(top), 1e-6), 0.0, 1.0)


def _composite(image: np.ndarray, stretch: bool) -> np.ndarray:
    """RGB composite of the first three channels (yellow left out, as the competition's RGB models see it)."""
    return np.stack([_display_scaled(image[..., c], stretch) for c in range(3)], axis=-1)


def _label_names(label: Any) -> list[str]:
    if isinstance(label, str):
        return names_of(parse_label(label))
    return names_of(np.asarray(label, np.float32))


def channel_grid(
    images: np.ndarray, labels: Sequence[Any], ids: Sequence[str] | None = None, stretch: bool = True
) -> Figure:
    """Each image's channels (red, green, blue and yellow when present) and its RGB composite, one row per image.

    `images` is ``[N, S, S, 3 or 4]`` on the 0–255 scale, in the channel order red, green,
    blue, yellow; `labels` are multi-hot rows or train.csv strings such as ``"8|5"``. Each row
    is titled with the image ID and its label names. With `stretch` each panel is contrast-
    stretched to its own 99.5th percentile.
    """
    show_figures_inline()
    batch = np.asarray(images, np.float32)
    if batch.ndim != 4 or batch.shape[-1] not in (3, 4):
        raise ValueError(f"images must be [N, height, width, 3 or 4], got shape {batch.shape}")
    channels = CHANNEL_NAMES[: batch.shape[-1]]
    columns = len(channels) + 1
    figure = Figure(figsize=(2.6 * columns, 3.0 * len(batch)), layout="constrained", dpi=FIGURE_DPI)
    rows = figure.subfigures(len(batch), 1, squeeze=False)[:, 0]
    for row, image, label, index in zip(rows, batch, labels, range(len(batch))):
        image_id = ids[index] if ids is not None else f"image {index}"
        row.suptitle(f"{image_id}: {', '.join(_label_names(label)) or 'no label'}", fontsize=11, fontweight="bold")
        axes = row.subplots(1, columns)
        for axis, channel_index, name in zip(axes, range(len(channels)), channels):
            axis.imshow(
                _display_scaled(image[..., channel_index], stretch), cmap=CHANNEL_COLORMAPS[name], vmin=0, vmax=1
            )
            axis.set_title(name, fontsize=10)
        axes[-1].imshow(_composite(image, stretch))
        axes[-1].set_title("composite (R, G, B)", fontsize=10)
        for axis in axes:
            axis.set_axis_off()
    return figure


def augmentation_grid(image: np.ndarray, seed: int = 0, samples: int = 4, stretch: bool = True) -> Figure:
    """One image under each augmentation step alone, then under the full chain: a row per step.

    The first column is the untouched image; the others are draws with seeds ``(seed, 0..samples-1)``,
    shown as RGB composites. A step draws from the same slice of the seed alone as in the chain.
    """
    show_figures_inline()
    original = np.asarray(image, np.float32)
    rows = {**{name: [name] for name in STEPS}, "full chain": None}
    figure = Figure(figsize=(2.4 * (samples + 1), 2.5 * len(rows)), layout="constrained", dpi=FIGURE_DPI)
    axes = figure.subplots(len(rows), samples + 1, squeeze=False)
    for row, (name, steps) in zip(axes, rows.items()):
        row[0].imshow(_composite(original, stretch))
        row[0].set_title("original", fontsize=9)
        row[0].set_ylabel(name, fontsize=10)
        for draw, axis in enumerate(row[1:]):
            axis.imshow(_composite(augment(original, (seed, draw), steps).numpy(), stretch))
            axis.set_title(f"seed ({seed}, {draw})", fontsize=9)
        for axis in row:
            axis.set_xticks([])
            axis.set_yticks([])
    return figure


def prediction_grid(
    images: np.ndarray,
    y_true: np.ndarray,
    y_score: np.ndarray,
    ids: Sequence[str] | None = None,
    top_k: int = 3,
    columns: int = 4,
    stretch: bool = True,
) -> Figure:
    """RGB composites titled with the true labels and the `top_k` predicted classes with their probabilities.

    A predicted class that is also a true label is marked ✓; the title is green when the
    top prediction is right, red otherwise.
    """
    show_figures_inline()
    batch = np.asarray(images, np.float32)
    truth = np.asarray(y_true, np.float32)
    score = np.asarray(y_score, np.float32)
    if not len(batch) == len(truth) == len(score):
        raise ValueError(f"{len(batch)} images, {len(truth)} label rows and {len(score)} score rows must match")
    columns = max(1, min(columns, len(batch)))
    rows = max(1, -(-len(batch) // columns))
    figure = Figure(figsize=(3.6 * columns, 4.2 * rows), layout="constrained", dpi=FIGURE_DPI)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for index, axis in enumerate(axes):
        axis.set_axis_off()
        if index >= len(batch):
            continue
        axis.imshow(_composite(batch[index], stretch))
        ranked = np.argsort(-score[index])[:top_k]
        predicted = [f"{'✓ ' if truth[index, c] else ''}{LABEL_NAMES[c]} {score[index, c]:.2f}" for c in ranked]
        heading = ids[index] if ids is not None else f"image {index}"
        true_names = ", ".join(names_of(truth[index])) or "no label"
        axis.set_title(
            f"{heading}\ntrue: {true_names}\npredicted: " + "\n".join(predicted),
            fontsize=8,
            color="green" if truth[index, ranked[0]] else "firebrick",
            loc="left",
        )
    figure.suptitle("Sample predictions (top classes with probabilities)", fontsize=12, fontweight="bold")
    return figure
