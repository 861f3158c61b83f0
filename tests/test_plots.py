"""Every plot function returns a figure on the small sample's data; saving and the diagram fallback."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from matplotlib.figure import Figure
from PIL import Image

from hpa_nb import metrics, plots
from hpa_nb.labels import LABEL_NAMES, N_CLASSES, label_matrix


@pytest.fixture(scope="module")
def sample_labels(small_sample) -> pd.DataFrame:
    return pd.read_csv(small_sample / "train.csv")


@pytest.fixture(scope="module")
def sample_matrix(sample_labels) -> np.ndarray:
    return label_matrix(sample_labels["ID"], sample_labels["Label"])


@pytest.fixture(scope="module")
def sample_images(small_sample, sample_labels) -> np.ndarray:
    """The first four images, RGBY, resized to 32 px, on the 0–255 scale like the data pipeline's."""
    def channel(image_id: str, color: str) -> np.ndarray:
        with Image.open(small_sample / "train" / f"{image_id}_{color}.png") as image:
            array = np.asarray(image, np.float32)
        array = array / 257.0 if array.max() > 255 else array
        return np.asarray(Image.fromarray(array).resize((32, 32)), np.float32)

    ids = sample_labels["ID"][:4]
    return np.stack([np.stack([channel(i, c) for c in plots.CHANNEL_NAMES], axis=-1) for i in ids])


@pytest.fixture(scope="module")
def fake_scores(sample_matrix) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.clip(0.4 * sample_matrix + 0.6 * rng.random(sample_matrix.shape), 0, 1)


def _trace_names(fig: go.Figure) -> list[str]:
    return [trace.name for trace in fig.data]


def test_class_distribution_shows_counts_and_weights_by_name(sample_matrix):
    fig = plots.class_distribution(sample_matrix)
    assert isinstance(fig, go.Figure)
    bars, weights = fig.data
    assert list(bars.x) == list(LABEL_NAMES)
    np.testing.assert_array_equal(bars.y, sample_matrix.sum(axis=0))
    assert np.all((np.asarray(weights.y) >= 1) & (np.asarray(weights.y) <= 20))


def test_label_statistics_figures(sample_matrix):
    per_image = plots.labels_per_image(sample_matrix)
    assert sum(per_image.data[0].y) == len(sample_matrix)
    heatmap = plots.label_cooccurrence(sample_matrix)
    np.testing.assert_array_equal(np.diag(np.asarray(heatmap.data[0].z)), sample_matrix.sum(axis=0))
    normalised = np.asarray(plots.label_cooccurrence(sample_matrix, normalize=True).data[0].z)
    present = sample_matrix.sum(axis=0) > 0
    np.testing.assert_allclose(np.diag(normalised)[present], 1.0)


def test_image_sizes_reads_headers(small_sample, sample_labels):
    properties = plots.image_properties(small_sample, sample_labels["ID"][:6])
    assert list(properties.columns) == ["ID", "width", "height", "bit_depth", "mode"]
    assert set(properties["bit_depth"]) <= {8, 16}
    fig = plots.image_sizes(properties)
    assert sum(sum(trace.y) for trace in fig.data) == 6
    with pytest.raises(FileNotFoundError, match="missing-id"):
        plots.image_properties(small_sample, ["missing-id"])


def test_lr_schedule_accepts_python_and_keras_schedules():
    fig = plots.lr_schedule(lambda step: 1e-3 * 0.5 ** (step // 10), 40, steps_per_epoch=10)
    assert fig.data[0].y[0] == pytest.approx(1e-3) and fig.data[0].y[-1] == pytest.approx(1.25e-4)
    assert fig.data[0].x[-1] == pytest.approx(3.9)
    from hpa_nb.schedule import from_epochs

    warmup = plots.lr_schedule(from_epochs(steps_per_epoch=10, global_batch_size=64, max_lr=1e-3, initial_lr=1e-5),
                               50, steps_per_epoch=10)
    values = np.asarray(warmup.data[0].y)
    assert values[0] == pytest.approx(1e-5) and values.max() == pytest.approx(1e-3)
    assert int(np.argmax(values)) == 10  # the end of the one-epoch warmup
    import keras

    cosine = keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=5000)
    long_fig = plots.lr_schedule(cosine, 5000)
    assert len(long_fig.data[0].y) <= plots.MAX_CURVE_POINTS
    assert long_fig.data[0].y[0] == pytest.approx(1e-3) and long_fig.data[0].y[-1] == pytest.approx(0, abs=1e-8)


def test_training_history_plots_loss_and_auc_for_train_and_val(tmp_path):
    history = pd.DataFrame({"epoch": [0, 1, 2], "auc": [0.6, 0.7, 0.8], "loss": [0.9, 0.6, 0.5],
                            "val_auc": [0.55, 0.6, 0.65], "val_loss": [1.0, 0.8, 0.7]})
    history.to_csv(tmp_path / "history.csv", index=False)
    fig = plots.training_history(tmp_path / "history.csv")
    assert sorted(name.split()[0] for name in _trace_names(fig)) == ["auc", "loss", "val_auc", "val_loss"]
    assert list(fig.data[0].x) == [1, 2, 3]
    loss_only = plots.training_history({"loss": [0.9, 0.5]})
    assert _trace_names(loss_only) == ["loss (training)"]
    assert any("no AUC" in note.text for note in loss_only.layout.annotations)


def test_evaluation_figures_name_every_present_class(sample_matrix, fake_scores):
    truth = sample_matrix.copy()
    truth[:, 4] = 0  # an absent class gets no bar and no curve, and no crash
    result = metrics.image_metrics(truth, fake_scores)
    bars = plots.per_class_scores(result)
    assert list(bars.data[0].y) == list(LABEL_NAMES)
    assert np.isnan(bars.data[0].x[4])
    assert any(note.text == "absent" for note in bars.layout.annotations)
    curves = plots.precision_recall_curves(truth, fake_scores)
    present = [LABEL_NAMES[c] for c in range(N_CLASSES) if truth[:, c].any()]
    assert [name.rsplit(" (AP", 1)[0] for name in _trace_names(curves)] == present + ["micro-average"]


def test_image_grids_are_matplotlib_figures_titled_with_label_names(sample_images, sample_matrix, fake_scores,
                                                                    sample_labels):
    ids = list(sample_labels["ID"][:2])
    grid = plots.channel_grid(sample_images[:2], sample_labels["Label"][:2], ids=ids)
    assert isinstance(grid, Figure)
    titles = [subfigure._suptitle.get_text() for subfigure in grid.subfigs]
    first_names = [LABEL_NAMES[int(c)] for c in sample_labels["Label"][0].split("|")]
    assert titles[0].startswith(ids[0]) and all(name in titles[0] for name in first_names)
    assert len(grid.subfigs[0].axes) == 5  # red, green, blue, yellow, composite
    assert len(plots.channel_grid(sample_images[:1, ..., :3], sample_matrix[:1]).subfigs[0].axes) == 4
    predictions = plots.prediction_grid(sample_images, sample_matrix[:4], fake_scores[:4], ids=list(
        sample_labels["ID"][:4]), columns=3)
    assert isinstance(predictions, Figure)
    top = LABEL_NAMES[int(np.argmax(fake_scores[0]))]
    assert top in predictions.axes[0].get_title(loc="left")


def test_saved_writes_the_figure_and_hands_it_back(tmp_path, sample_matrix):
    fig = plots.labels_per_image(sample_matrix)
    assert plots.saved(fig, tmp_path / "labels") is fig
    assert (tmp_path / "labels.html").is_file()


def test_augmentation_grid_has_a_row_per_step_plus_the_chain(sample_images):
    from hpa_nb.augment import STEPS

    grid = plots.augmentation_grid(sample_images[0], seed=3, samples=2)
    assert isinstance(grid, Figure)
    rows = [axis.get_ylabel() for axis in grid.axes[::3]]
    assert rows == list(STEPS) + ["full chain"]
    assert grid.axes[-1].get_title() == "seed (3, 1)" and grid.axes[-3].get_title() == "original"


def test_save_figure_writes_html_and_png(tmp_path, sample_matrix, sample_images, capsys):
    written = plots.save_figure(plots.labels_per_image(sample_matrix), tmp_path / "labels.html")
    assert tmp_path / "labels.html" in written
    assert "Plotly" in (tmp_path / "labels.html").read_text()
    written = plots.save_figure(plots.channel_grid(sample_images[:1], ["0"]), tmp_path / "grid")
    assert written == [tmp_path / "grid.png"] and Image.open(written[0]).format == "PNG"
    assert not list(tmp_path.glob(".*")), "no temporary files left behind"


def test_model_diagram_opens_up_a_nested_backbone(monkeypatch):
    import visualkeras

    from hpa_nb.model import build

    drawn = []
    monkeypatch.setattr(visualkeras, "layered_view", lambda model, **options: drawn.append(model) or "image")
    classifier = build("tiny", image_size=32, channels=3, weights=None)
    assert plots.model_diagram(classifier) == "image"
    assert drawn == [classifier.get_layer("backbone")]  # its conv blocks, not one "Functional" box


def test_model_diagram_draws_a_png_and_survives_a_visualkeras_failure(tmp_path, monkeypatch, capsys):
    import keras
    import visualkeras

    inputs = keras.Input((16, 16, 3))
    hidden = keras.layers.Conv2D(4, 3)(inputs)
    outputs = keras.layers.Dense(N_CLASSES, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(hidden))
    model = keras.Model(inputs, outputs)
    image = plots.model_diagram(model, tmp_path / "model.png")
    assert image is not None and Image.open(tmp_path / "model.png").format == "PNG"

    def broken(*args, **kwargs):
        raise AttributeError("'InputLayer' object has no attribute 'output_shape'")

    monkeypatch.setattr(visualkeras, "layered_view", broken)
    assert plots.model_diagram(model, tmp_path / "broken.png") is None
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith("warning: visualkeras could not draw")
    assert not (tmp_path / "broken.png").exists()


def test_image_grids_display_as_one_jpeg_in_a_notebook_without_pyplot(sample_images):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        figure = plots.channel_grid(sample_images[:1], ["0"])
        formatted, _ = shell.display_formatter.format(figure)
        assert "image/jpeg" in formatted and "image/png" not in formatted
        assert formatted["image/jpeg"].startswith("/9j/")  # base64 of a JPEG stream (FF D8 FF)
    finally:
        InteractiveShell.clear_instance()
