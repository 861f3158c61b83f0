"""The training figures: label counts and class weights, the learning-rate schedule, the history, the model.

All matplotlib (`hpa_nb.plots.figures.Chart`), because Kaggle's TPU image, where the training kernel
runs, has matplotlib but not plotly, kaleido or visualkeras. The model diagram uses visualkeras
where it is installed and otherwise draws the backbone's shape profile with matplotlib.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from hpa_nb.core.labels import LABEL_NAMES, N_CLASSES, class_weights, label_counts, multi_hot
from hpa_nb.plots.figures import Chart, chart, save_figure

logger = logging.getLogger(__name__)

COLORS = {"train": "#1f77b4", "val": "#ff7f0e", "weight": "#d62728", "channels": "#2ca02c"}
MAX_CURVE_POINTS = 1000  # an LR curve needs no more points than a screen has pixels


def class_distribution(labels: np.ndarray, max_weight: float = 20.0) -> Chart:
    """Images per class (bars) and the positive class weight training uses (markers, right axis)."""
    matrix = multi_hot(labels)
    counts = label_counts(matrix)
    weights = class_weights(matrix, max_weight=max_weight)
    figure = chart(10, 4.6)
    axis = figure.subplots()
    positions = np.arange(N_CLASSES)
    axis.bar(positions, counts, color=COLORS["train"], label="images")
    axis.set_xticks(positions, LABEL_NAMES, rotation=45, ha="right", fontsize=8)
    axis.set_ylabel("images with the label")
    weight_axis = axis.twinx()
    weight_axis.plot(positions, weights, "o:", color=COLORS["weight"], label="class weight")
    weight_axis.set_ylabel(f"positive class weight (1–{max_weight:g})")
    weight_axis.set_ylim(0, max_weight * 1.05)
    figure.legend(loc="outside upper right", ncols=2, fontsize=8)
    figure.suptitle(f"Label distribution over {len(matrix)} images, with class weights", x=0.01, ha="left")
    return figure


def _schedule_values(schedule: Callable[[Any], Any], steps: np.ndarray) -> np.ndarray:
    """Evaluate a schedule on all steps at once when it broadcasts (Keras schedules do), else step by step."""
    try:
        values = np.asarray(schedule(steps), np.float64)
        if values.shape == steps.shape:
            return values
    except Exception:  # noqa: BLE001  a plain Python schedule may not accept arrays
        pass
    return np.array([float(np.asarray(schedule(int(step)))) for step in steps])


def schedule_curve(schedule: Callable[[Any], Any], steps: int | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(steps, learning rates) of `schedule`, at most `MAX_CURVE_POINTS` of them, evenly spread."""
    all_steps = np.arange(steps) if isinstance(steps, (int, np.integer)) else np.asarray(list(steps))
    if all_steps.size == 0:
        raise ValueError("lr_schedule needs at least one step")
    if all_steps.size > MAX_CURVE_POINTS:
        all_steps = np.unique(np.linspace(all_steps[0], all_steps[-1], MAX_CURVE_POINTS).round().astype(int))
    return all_steps, _schedule_values(schedule, all_steps)


def lr_schedule(
    schedule: Callable[[Any], Any], steps: int | Sequence[int], steps_per_epoch: int | None = None
) -> Chart:
    """The learning rate a schedule gives at each optimizer step.

    `schedule` is any callable step → learning rate, a Keras ``LearningRateSchedule``
    included. `steps` is the number of steps or the steps themselves. With `steps_per_epoch`
    the x axis counts epochs.
    """
    all_steps, values = schedule_curve(schedule, steps)
    figure = chart(8, 3.6)
    axis = figure.subplots()
    axis.plot(all_steps / steps_per_epoch if steps_per_epoch else all_steps, values, color=COLORS["train"], lw=2.5)
    axis.set_xlabel("epoch" if steps_per_epoch else "optimizer step")
    axis.set_ylabel("learning rate")
    axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    axis.grid(alpha=0.3)
    axis.set_title(f"Learning-rate schedule (peak {values.max():.3g}, final {values[-1]:.3g})", loc="left")
    return figure


def _history_frame(history: pd.DataFrame | Mapping[str, Sequence[float]] | str | os.PathLike) -> pd.DataFrame:
    if isinstance(history, (str, os.PathLike)):
        return pd.read_csv(history)
    if isinstance(history, pd.DataFrame):
        return history
    return pd.DataFrame(dict(history))


HISTORY_PANELS = {"loss": re.compile(r"^(val_)?loss$"), "ROC AUC": re.compile(r"^(val_)?.*auc.*$", re.IGNORECASE)}


def training_history(history: pd.DataFrame | Mapping[str, Sequence[float]] | str | os.PathLike) -> Chart:
    """Loss and AUC per epoch, training (solid) and validation (dashed), side by side.

    `history` is RUN/history.csv (a path or its DataFrame) or a Keras ``History.history`` dict.
    Keras names the AUC metric ``auc``, ``auc_1``, ... depending on the session: any column
    containing "auc" is used.
    """
    frame = _history_frame(history)
    if "epoch" in frame:
        epochs = frame["epoch"].to_numpy() + (1 if len(frame) and frame["epoch"].min() == 0 else 0)
    else:
        epochs = np.arange(1, len(frame) + 1)
    figure = chart(10, 3.8)
    for axis, (title, pattern) in zip(figure.subplots(1, 2), HISTORY_PANELS.items()):
        columns = [column for column in frame.columns if pattern.match(column)]
        for name in columns:
            validation = name.startswith("val_")
            axis.plot(
                epochs,
                frame[name],
                "o--" if validation else "o-",
                color=COLORS["val" if validation else "train"],
                label=f"{name} ({'validation' if validation else 'training'})",
            )
        if columns:
            axis.legend(fontsize=8)
        else:
            axis.text(0.5, 0.5, f"no {title} recorded", ha="center", va="center", transform=axis.transAxes)
        axis.set_title(title, loc="left")
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        if len(epochs) <= 20:
            axis.set_xticks(epochs)
    figure.suptitle(f"Training history ({len(frame)} epochs)", x=0.01, ha="left")
    return figure


# --- the model ------------------------------------------------------------------------------
def _shape_profile(model: Any) -> pd.DataFrame:
    """Depth, feature-map side and channels of every layer that outputs a feature map.

    1×1 maps are left out: they are squeeze-and-excitation branches beside the main path.
    """
    rows = []
    for depth, layer in enumerate(model.layers):
        shape = getattr(layer, "output", None)
        shape = getattr(shape, "shape", None)
        if shape is not None and len(shape) == 4 and shape[1] != 1:
            rows.append({"depth": depth, "layer": layer.name, "side": shape[1], "channels": shape[3]})
    return pd.DataFrame(rows, columns=["depth", "layer", "side", "channels"])


def shape_profile(model: Any) -> Chart:
    """The backbone drawn without visualkeras: feature-map side and channels along its depth."""
    profile = _shape_profile(model)
    figure = chart(9, 3.4)
    axis = figure.subplots()
    axis.step(profile["depth"], profile["side"], where="post", color=COLORS["train"], label="feature-map side (px)")
    axis.set_xlabel("layer (depth)")
    axis.set_ylabel("feature-map side (px)")
    channel_axis = axis.twinx()
    channel_axis.step(profile["depth"], profile["channels"], where="post", color=COLORS["channels"], label="channels")
    channel_axis.set_ylabel("channels")
    figure.legend(loc="outside upper right", ncols=2, fontsize=8)
    parameters = sum(int(np.prod(weight.shape)) for weight in model.weights)
    figure.suptitle(f"{model.name}: {len(model.layers)} layers, {parameters:,} weights", x=0.01, ha="left")
    return figure


def model_diagram(model: Any, path: str | os.PathLike | None = None, **layered_view_options: Any) -> Any:
    """A picture of `model`'s backbone (saved as PNG when `path` is given), or None.

    With visualkeras installed: its layered view (a PIL image). Without it (Kaggle's TPU image):
    `shape_profile`, a matplotlib chart. A model wrapping one nested model (ours: the backbone,
    then the pooling/dropout/sigmoid head) is drawn through that nested model's own layers. If
    visualkeras cannot draw the model (some Keras versions), this prints one warning line and
    returns None instead of failing the notebook.
    """
    nested = [layer for layer in getattr(model, "layers", []) if hasattr(layer, "layers")]
    drawn = nested[0] if len(nested) == 1 else model
    try:
        import visualkeras  # 0.1.4 where installed; Kaggle's TPU image lacks it
    except ImportError:
        logger.info("note: visualkeras is not installed, so the diagram is the backbone's shape profile (matplotlib)")
        image = shape_profile(drawn)
    else:
        # legend_text_spacing_offset=0: any other value makes visualkeras 0.1.4 warn that it is deprecated.
        options = {"legend": True, "spacing": 20, "legend_text_spacing_offset": 0, **layered_view_options}
        try:
            image = visualkeras.layered_view(drawn, **options)
        except Exception as exc:  # noqa: BLE001  a diagram is a nicety; never let it stop a run
            message = " ".join(str(exc).split()) or type(exc).__name__
            logger.warning(
                f"warning: visualkeras could not draw the model diagram ({type(exc).__name__}: {message}); skipped"
            )
            return None
    if path is not None:
        save_figure(image, path)
    return image
