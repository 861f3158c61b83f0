"""Every plot function returns a figure on the small sample's data; saving and the diagram fallback."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from matplotlib.figure import Figure
from PIL import Image

from hpa_nb.core import metrics
from hpa_nb.core.labels import LABEL_NAMES, N_CLASSES, label_matrix
from hpa_nb.data.augment import STEPS
from hpa_nb.plots import charts


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
    return np.stack([np.stack([channel(i, c) for c in charts.CHANNEL_NAMES], axis=-1) for i in ids])


@pytest.fixture(scope="module")
def fake_scores(sample_matrix) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.clip(0.4 * sample_matrix + 0.6 * rng.random(sample_matrix.shape), 0, 1)


def _trace_names(fig: go.Figure) -> list[str]:
    return [trace.name for trace in fig.data]


def test_label_statistics_figures(sample_matrix):
    per_image = charts.labels_per_image(sample_matrix)
    assert sum(per_image.data[0].y) == len(sample_matrix)
    heatmap = charts.label_cooccurrence(sample_matrix)
    np.testing.assert_array_equal(np.diag(np.asarray(heatmap.data[0].z)), sample_matrix.sum(axis=0))
    normalised = np.asarray(charts.label_cooccurrence(sample_matrix, normalize=True).data[0].z)
    present = sample_matrix.sum(axis=0) > 0
    np.testing.assert_allclose(np.diag(normalised)[present], 1.0)


def test_image_sizes_reads_headers(small_sample, sample_labels):
    properties = charts.image_properties(small_sample, sample_labels["ID"][:6])
    assert list(properties.columns) == ["ID", "width", "height", "bit_depth", "mode"]
    assert set(properties["bit_depth"]) <= {8, 16}
    fig = charts.image_sizes(properties)
    assert sum(sum(trace.y) for trace in fig.data) == 6
    with pytest.raises(FileNotFoundError, match="missing-id"):
        charts.image_properties(small_sample, ["missing-id"])


def test_evaluation_figures_name_every_present_class(sample_matrix, fake_scores):
    truth = sample_matrix.copy()
    truth[:, 4] = 0  # an absent class gets no bar and no curve, and no crash
    result = metrics.image_metrics(truth, fake_scores)
    bars = charts.per_class_scores(result)
    assert list(bars.data[0].y) == list(LABEL_NAMES)
    assert np.isnan(bars.data[0].x[4])
    assert any(note.text == "absent" for note in bars.layout.annotations)
    curves = charts.precision_recall_curves(truth, fake_scores)
    present = [LABEL_NAMES[c] for c in range(N_CLASSES) if truth[:, c].any()]
    assert [name.rsplit(" (AP", 1)[0] for name in _trace_names(curves)] == present + ["micro-average"]


def test_image_grids_are_matplotlib_figures_titled_with_label_names(
    sample_images, sample_matrix, fake_scores, sample_labels
):
    ids = list(sample_labels["ID"][:2])
    grid = charts.channel_grid(sample_images[:2], sample_labels["Label"][:2], ids=ids)
    assert isinstance(grid, Figure)
    titles = [subfigure._suptitle.get_text() for subfigure in grid.subfigs]
    first_names = [LABEL_NAMES[int(c)] for c in sample_labels["Label"][0].split("|")]
    assert titles[0].startswith(ids[0]) and all(name in titles[0] for name in first_names)
    assert len(grid.subfigs[0].axes) == 5  # red, green, blue, yellow, composite
    assert len(charts.channel_grid(sample_images[:1, ..., :3], sample_matrix[:1]).subfigs[0].axes) == 4
    predictions = charts.prediction_grid(
        sample_images, sample_matrix[:4], fake_scores[:4], ids=list(sample_labels["ID"][:4]), columns=3
    )
    assert isinstance(predictions, Figure)
    top = LABEL_NAMES[int(np.argmax(fake_scores[0]))]
    assert top in predictions.axes[0].get_title(loc="left")


def test_augmentation_grid_has_a_row_per_step_plus_the_chain(sample_images):
    grid = charts.augmentation_grid(sample_images[0], seed=3, samples=2)
    assert isinstance(grid, Figure)
    rows = [axis.get_ylabel() for axis in grid.axes[::3]]
    assert rows == list(STEPS) + ["full chain"]
    assert grid.axes[-1].get_title() == "seed (3, 1)" and grid.axes[-3].get_title() == "original"


def test_image_grids_display_as_one_jpeg_in_a_notebook_without_pyplot(sample_images):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        figure = charts.channel_grid(sample_images[:1], ["0"])
        formatted, _ = shell.display_formatter.format(figure)
        assert "image/jpeg" in formatted and "image/png" not in formatted
        assert formatted["image/jpeg"].startswith("/9j/")  # base64 of a JPEG stream (FF D8 FF)
    finally:
        InteractiveShell.clear_instance()
