"""hpa_nb.plots.training: the training kernel's matplotlib figures, and the model diagram with and without visualkeras."""

from __future__ import annotations

import sys

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hpa_nb.core.labels import LABEL_NAMES, N_CLASSES
from hpa_nb.plots import training as training_plots
from hpa_nb.plots.figures import Chart
from hpa_nb.training.model import build
from hpa_nb.training.schedule import from_epochs


def _line(figure: Chart, axis: int = 0, line: int = 0) -> tuple[np.ndarray, np.ndarray]:
    drawn = figure.axes[axis].get_lines()[line]
    return np.asarray(drawn.get_xdata(), float), np.asarray(drawn.get_ydata(), float)


def test_class_distribution_shows_counts_and_weights_by_name():
    matrix = np.zeros((10, N_CLASSES), np.float32)
    matrix[:6, 0] = 1
    matrix[:1, 3] = 1
    figure = training_plots.class_distribution(matrix)
    bars = figure.axes[0].patches
    assert [tick.get_text() for tick in figure.axes[0].get_xticklabels()] == list(LABEL_NAMES)
    assert [bar.get_height() for bar in bars][:4] == [6, 0, 0, 1]
    _, weights = _line(figure, axis=1)
    assert weights[0] == pytest.approx(1.0) and weights[3] == pytest.approx(9.0) and weights[1] == 20
    with pytest.raises(ValueError, match="multi-hot"):
        training_plots.class_distribution(np.zeros((3, 4)))


def test_lr_schedule_accepts_python_and_keras_schedules():
    steps, values = _line(training_plots.lr_schedule(lambda step: 1e-3 * 0.5 ** (step // 10), 40, steps_per_epoch=10))
    assert values[0] == pytest.approx(1e-3) and values[-1] == pytest.approx(1.25e-4)
    assert steps[-1] == pytest.approx(3.9)

    warmup = from_epochs(steps_per_epoch=10, global_batch_size=64, max_lr=1e-3, initial_lr=1e-5)
    _, values = _line(training_plots.lr_schedule(warmup, 50, steps_per_epoch=10))
    assert values[0] == pytest.approx(1e-5) and values.max() == pytest.approx(1e-3)
    assert int(np.argmax(values)) == 10  # the end of the one-epoch warmup

    cosine = keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=5000)
    steps, values = _line(training_plots.lr_schedule(cosine, 5000))
    assert len(values) <= training_plots.MAX_CURVE_POINTS and steps[-1] == 4999
    assert values[0] == pytest.approx(1e-3) and values[-1] == pytest.approx(0, abs=1e-8)


def test_training_history_plots_loss_and_auc_for_train_and_val(tmp_path):
    history = pd.DataFrame(
        {
            "epoch": [0, 1, 2],
            "auc": [0.6, 0.7, 0.8],
            "loss": [0.9, 0.6, 0.5],
            "val_auc": [0.55, 0.6, 0.65],
            "val_loss": [1.0, 0.8, 0.7],
        }
    )
    history.to_csv(tmp_path / "history.csv", index=False)
    figure = training_plots.training_history(tmp_path / "history.csv")
    labels = [line.get_label().split()[0] for axis in figure.axes for line in axis.get_lines()]
    assert labels == ["loss", "val_loss", "auc", "val_auc"]
    epochs, auc = _line(figure, axis=1)
    assert list(epochs) == [1, 2, 3] and list(auc) == [0.6, 0.7, 0.8]
    loss_only = training_plots.training_history({"loss": [0.9, 0.5]})
    assert [line.get_label() for line in loss_only.axes[0].get_lines()] == ["loss (training)"]
    assert "no ROC AUC" in loss_only.axes[1].texts[0].get_text()


def _classifier():
    return build("tiny", image_size=32, channels=3, weights=None)


def test_model_diagram_opens_up_a_nested_backbone(monkeypatch):
    visualkeras = pytest.importorskip("visualkeras")
    drawn = []
    monkeypatch.setattr(visualkeras, "layered_view", lambda model, **options: drawn.append(model) or "image")
    classifier = _classifier()
    assert training_plots.model_diagram(classifier) == "image"
    assert drawn == [classifier.get_layer("backbone")]  # its conv blocks, not one "Functional" box


def test_model_diagram_survives_a_visualkeras_failure(tmp_path, monkeypatch, capsys):
    visualkeras = pytest.importorskip("visualkeras")

    def broken(*args, **kwargs):
        raise AttributeError("'InputLayer' object has no attribute 'output_shape'")

    monkeypatch.setattr(visualkeras, "layered_view", broken)
    assert training_plots.model_diagram(_classifier(), tmp_path / "broken.png") is None
    printed = capsys.readouterr().err.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith("warning: visualkeras could not draw")
    assert not (tmp_path / "broken.png").exists()


def test_without_visualkeras_the_diagram_is_a_matplotlib_shape_profile(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "visualkeras", None)  # as on Kaggle's TPU image
    classifier = _classifier()
    figure = training_plots.model_diagram(classifier, tmp_path / "model.png")
    assert isinstance(figure, Chart) and Image.open(tmp_path / "model.png").format == "PNG"
    assert "visualkeras is not installed" in capsys.readouterr().err
    depth, side = _line(figure)
    assert side[0] == 32 and side[-1] < side[0]  # the feature maps shrink along the backbone
    _, channels = _line(figure, axis=1)
    assert channels[-1] > channels[0]
