"""Image-level metrics (scikit-learn underneath): worked cases, the tuned F1, the averages, and null handling."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics as sk

from hpa_nb.core import metrics
from hpa_nb.core.labels import LABEL_NAMES, N_CLASSES


def _fixed_arrays(images: int = 60, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores correlated with them, rounded to 1 decimal so that ties are common."""
    rng = np.random.default_rng(seed)
    truth = (rng.random((images, N_CLASSES)) < 0.3).astype(np.float32)
    scores = np.clip(0.35 * truth + rng.random((images, N_CLASSES)) * 0.7, 0, 1).round(1).astype(np.float32)
    return truth, scores


@pytest.mark.parametrize(
    "truth, scores, auc, ap",
    [
        ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75, 0.5 * 1 + 0.5 * 2 / 3),  # worked by hand
        ([1, 0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5, 0.5], 0.5, 0.6),  # all tied: one threshold admits every image
    ],
)
def test_binary_scores_on_cases_worked_by_hand(truth, scores, auc, ap):
    assert metrics.roc_auc(truth, scores) == pytest.approx(auc)
    assert metrics.average_precision(truth, scores) == pytest.approx(ap)
    precision, recall, thresholds = metrics.precision_recall_curve(truth, scores)
    assert (np.diff(thresholds) > 0).all() and (precision[-1], recall[-1]) == (1.0, 0.0)
    assert len(precision) == len(recall) == len(thresholds) + 1
    with pytest.raises(ValueError, match="at least one positive"):
        metrics.precision_recall_curve([0, 0], [0.1, 0.2])


def test_tuned_f1_is_the_best_over_every_threshold_and_reproducible():
    truth, scores = _fixed_arrays()
    for index in range(N_CLASSES):
        f1, threshold = metrics.best_f1_threshold(truth[:, index], scores[:, index])
        best = max(sk.f1_score(truth[:, index], scores[:, index] >= t) for t in np.unique(scores[:, index]))
        assert f1 == pytest.approx(best)
        # Predicting at the reported threshold gives the reported F1.
        assert sk.f1_score(truth[:, index], scores[:, index] >= threshold) == pytest.approx(f1)


def test_image_metrics_match_sklearn_per_class_macro_and_micro():
    truth, scores = _fixed_arrays()
    result = metrics.image_metrics(truth, scores)
    per_class_auc = sk.roc_auc_score(truth, scores, average=None)
    per_class_ap = sk.average_precision_score(truth, scores, average=None)
    for entry, auc, ap in zip(result["classes"], per_class_auc, per_class_ap):
        assert entry["roc_auc"] == pytest.approx(auc)
        assert entry["average_precision"] == pytest.approx(ap)
        assert entry["support"] == int(truth[:, entry["index"]].sum())
        assert entry["name"] == LABEL_NAMES[entry["index"]]
    assert result["macro_roc_auc"] == pytest.approx(sk.roc_auc_score(truth, scores, average="macro"))
    assert result["map"] == pytest.approx(sk.average_precision_score(truth, scores, average="macro"))
    assert result["micro"]["roc_auc"] == pytest.approx(sk.roc_auc_score(truth, scores, average="micro"))
    assert result["micro"]["average_precision"] == pytest.approx(
        sk.average_precision_score(truth, scores, average="micro")
    )
    predicted = scores >= np.array([result["thresholds"][name] for name in LABEL_NAMES])
    assert result["micro"]["f1"] == pytest.approx(sk.f1_score(truth, predicted, average="micro"))
    assert result["macro_f1"] == pytest.approx(sk.f1_score(truth, predicted, average="macro"))


def test_absent_classes_are_null_and_left_out_of_the_averages():
    truth, scores = _fixed_arrays()
    truth[:, 3] = 0  # no positives: every score undefined
    truth[:, 5] = 1  # no negatives: AUC undefined, AP and F1 defined
    result = metrics.image_metrics(truth, scores)
    absent, everywhere = result["classes"][3], result["classes"][5]
    assert absent["support"] == 0
    assert (absent["roc_auc"], absent["average_precision"], absent["f1"], absent["threshold"]) == (None,) * 4
    assert result["thresholds"][LABEL_NAMES[3]] is None
    assert everywhere["roc_auc"] is None
    assert everywhere["average_precision"] == pytest.approx(1.0)
    assert result["classes_present"] == N_CLASSES - 1
    defined = [c for c in range(N_CLASSES) if c not in (3, 5)]
    assert result["macro_roc_auc"] == pytest.approx(
        sk.roc_auc_score(truth[:, defined], scores[:, defined], average="macro")
    )
    present = [c for c in range(N_CLASSES) if c != 3]
    assert result["map"] == pytest.approx(
        sk.average_precision_score(truth[:, present], scores[:, present], average="macro")
    )
    # JSON null, never NaN
    text = json.dumps(result, allow_nan=False)
    assert json.loads(text)["classes"][3]["roc_auc"] is None


def test_no_positive_anywhere_gives_nulls_not_errors():
    truth = np.zeros((4, N_CLASSES), np.float32)
    scores = np.full((4, N_CLASSES), 0.2, np.float32)
    result = metrics.image_metrics(truth, scores)
    assert result["macro_roc_auc"] is None and result["map"] is None and result["macro_f1"] is None
    assert result["micro"]["roc_auc"] is None and result["micro"]["average_precision"] is None
    # Nothing true and nothing predicted at 0.5: F1 is undefined rather than 0 or 1.
    assert result["micro"]["f1"] is None


def test_given_thresholds_are_used_for_f1():
    truth, scores = _fixed_arrays()
    thresholds = [0.5] * N_CLASSES
    result = metrics.image_metrics(truth, scores, thresholds=thresholds)
    for entry in result["classes"]:
        expected = sk.f1_score(truth[:, entry["index"]], scores[:, entry["index"]] >= 0.5)
        assert entry["f1"] == pytest.approx(expected)
        assert entry["threshold"] == 0.5


@pytest.mark.parametrize(
    "truth, scores, message",
    [
        (np.zeros((3, 19)), np.zeros((4, 19)), "must both be"),
        (np.zeros((3, 19)), np.full((3, 19), np.nan), "NaN"),
        (np.full((3, 19), 2), np.zeros((3, 19)), "0 or 1"),
    ],
)
def test_bad_inputs_raise_value_error(truth, scores, message):
    with pytest.raises(ValueError, match=message):
        metrics.image_metrics(truth, scores)
