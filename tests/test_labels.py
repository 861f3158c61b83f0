import numpy as np
import pytest

import hpa_nb
from hpa_nb.core import labels


def test_names_are_the_competition_classes_in_index_order():
    assert hpa_nb.LABEL_NAMES is labels.LABEL_NAMES
    assert len(labels.LABEL_NAMES) == 19
    assert labels.LABEL_NAMES[0] == "Nucleoplasm"
    assert labels.LABEL_NAMES[11] == "Mitotic spindle"
    assert labels.LABEL_NAMES[17] == "Vesicles and punctate cytosolic patterns"
    assert labels.LABEL_NAMES[labels.NEGATIVE] == "Negative" and labels.NEGATIVE == 18


def test_parse_gives_float32_multi_hot():
    vector = labels.parse_label("8|5|0", "abc")
    assert vector.dtype == np.float32 and vector.shape == (19,)
    assert np.flatnonzero(vector).tolist() == [0, 5, 8]
    assert vector.sum() == 3


def test_repeated_class_is_fine():
    assert np.flatnonzero(labels.parse_label("17|17", "x")).tolist() == [17]


@pytest.mark.parametrize(
    "text, fragment", [("", "empty"), ("  ", "empty"), ("3|a", "'a'"), ("19", "19"), ("-1", "-1"), ("2||4", "''")]
)
def test_bad_labels_name_the_image_and_the_value(text, fragment):
    with pytest.raises(ValueError) as error:
        labels.parse_label(text, "img-42")
    assert "img-42" in str(error.value) and fragment in str(error.value)


def test_format_is_the_inverse_of_parse():
    assert labels.format_label(labels.parse_label("16|0|7", "x")) == "0|7|16"


def test_counts_and_class_weights():
    matrix = labels.label_matrix(["a", "b", "c", "d"], ["0", "0|16", "16", "18"])
    counts = labels.label_counts(matrix)
    assert counts[0] == 2 and counts[16] == 2 and counts[18] == 1 and counts.sum() == 5
    weights = labels.class_weights(matrix, max_weight=20.0)
    assert weights.dtype == np.float32
    assert weights[0] == pytest.approx(1.0)  # 2 negatives / 2 positives
    assert weights[18] == pytest.approx(3.0)  # 3 negatives / 1 positive
    assert weights[5] == pytest.approx(20.0)  # absent: capped


def test_names_of_thresholds_probabilities():
    probabilities = np.zeros(19)
    probabilities[[2, 14]] = [0.7, 0.4]
    assert labels.names_of(probabilities) == ["Nucleoli"]
    assert labels.names_of(probabilities, 0.3) == ["Nucleoli", "Mitochondria"]


def test_channel_sets_name_the_stains_in_channel_order():
    assert labels.colors_of("rgb") == ("red", "green", "blue")
    assert labels.colors_of("rgby") == labels.COLORS == ("red", "green", "blue", "yellow")
    with pytest.raises(ValueError, match="'rgbx'"):
        labels.colors_of("rgbx")
