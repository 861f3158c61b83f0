"""hpa_nb.core.metrics.cell_map: the competition's cell-level mAP, checked by hand and on the default sample."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from hpa_nb.core.labels import N_CLASSES
from hpa_nb.core.metrics import READINGS, cell_average_precisions, cell_map
from hpa_nb.segmentation.quality import load_cell_truth


def _two_cells() -> np.ndarray:
    mask = np.zeros((10, 10), np.uint16)
    mask[1:5, 1:5] = 1
    mask[5:9, 5:9] = 2
    return mask


def test_hand_computed_case():
    # Class 0: cell 1 (0.9, hit), a spurious cell (0.6, miss), cell 2 (0.4, hit): precision 1, 1/2, 2/3 at
    # recall 1/2, 1/2, 1 → envelope 1 then 2/3 → AP = 0.5 * 1 + 0.5 * 2/3 = 5/6. Class 5: one hit → 1.
    mask = _two_cells()
    spurious = np.zeros_like(mask, bool)
    spurious[0, 9] = True
    predictions = {"a": [(mask == 1, {0: 0.9}), (spurious, {0: 0.6}), (mask == 2, {0: 0.4, 5: 0.8})]}
    truth_labels = {"a": {1: {0}, 2: {0, 5}}}
    aps = cell_average_precisions(predictions, {"a": mask}, truth_labels)
    assert aps[0] == pytest.approx(5 / 6)
    assert aps[5] == pytest.approx(1.0)
    assert all(ap is None for c, ap in enumerate(aps) if c not in (0, 5))
    assert cell_map(predictions, {"a": mask}, truth_labels) == pytest.approx((5 / 6 + 1) / 2)


def test_duplicate_prediction_is_a_false_positive_and_missing_class_scores_zero():
    mask = _two_cells()
    predictions = {"a": [(mask == 1, {0: 0.9}), (mask == 1, {0: 0.8})]}
    aps = cell_average_precisions(predictions, {"a": mask}, {"a": {1: {0}, 2: {3}}})
    assert aps[0] == pytest.approx(1.0)  # the duplicate ranks after the hit: the envelope keeps precision 1
    assert aps[3] == 0.0  # cell 2's class was never predicted


def test_iou_threshold_applies():
    mask = _two_cells()
    half = mask == 1
    half[1:5, 3:5] = False  # IoU 0.5 with cell 1
    truth = {"a": {1: {0}}}
    assert cell_map({"a": [(half, {0: 1.0})]}, {"a": mask}, truth, iou=0.6) == 0.0
    assert cell_map({"a": [(half, {0: 1.0})]}, {"a": mask}, truth, iou=0.5) == 1.0


def test_the_challenge_reading_drops_classes_the_image_lacks_and_images_without_labelled_cells():
    mask = _two_cells()
    truth_masks = {"a": mask, "b": mask, "c": mask}
    truth_labels = {"a": {1: {0}, 2: {3}}, "b": {}, "c": {1: {5}}}  # b: cells, none labelled
    predictions = {
        "a": [(mask == 1, {0: 0.9, 5: 0.99, 3: 0.95}), (mask == 2, {3: 0.8})],  # 5 is not a's; 3 is (cell 2)
        "b": [(mask == 1, {0: 0.99})],
        "c": [(mask == 1, {5: 0.7})],
    }
    challenge = cell_average_precisions(predictions, truth_masks, truth_labels, reading="challenge")
    everything = cell_average_precisions(predictions, truth_masks, truth_labels, reading="all_classes")
    # Class 0: b's 0.99 counts only in all_classes, as a false positive ranked first: precision 1/2 at recall 1.
    assert challenge[0] == pytest.approx(1.0) and everything[0] == pytest.approx(0.5)
    # Class 5: a's 0.99 on a cell of class 0 is dropped by the challenge reading, a false positive otherwise.
    assert challenge[5] == pytest.approx(1.0) and everything[5] == pytest.approx(0.5)
    # Class 3 is a's, so a's 0.95 on cell 1 (class 0) is a false positive in both readings.
    assert challenge[3] == everything[3] == pytest.approx(0.5)
    assert cell_map(predictions, truth_masks, truth_labels) == pytest.approx(2.5 / 3)  # challenge by default
    assert cell_map(predictions, truth_masks, truth_labels, reading="all_classes") == pytest.approx(1.5 / 3)
    with pytest.raises(ValueError, match="reading 'kaggle'"):
        cell_map(predictions, truth_masks, truth_labels, reading="kaggle")


@pytest.mark.parametrize("reading", READINGS)
def test_empty_predicted_masks_and_empty_truth_cells_do_not_count(reading):
    mask = _two_cells()
    truth_labels = {"a": {1: {0}, 2: {0}, 7: {4}}}  # cell 7 has no pixels
    empty = np.zeros_like(mask, bool)
    predictions = {"a": [(empty, {0: 0.99, 4: 0.99}), (mask == 1, {0: 0.9}), (mask == 2, {0: 0.8})]}
    aps = cell_average_precisions(predictions, {"a": mask}, truth_labels, reading=reading)
    assert aps[0] == pytest.approx(1.0)  # the empty mask is not a false positive ranked first
    assert aps[4] is None  # no positive: the cell without pixels is not counted as a missed one


def test_input_errors_name_the_image():
    mask = _two_cells()
    with pytest.raises(ValueError, match="image b"):
        cell_map({"b": []}, {"a": mask}, {"a": {1: {0}}})
    with pytest.raises(ValueError, match="image a"):
        cell_map({"a": [(np.ones((3, 3), bool), {0: 1.0})]}, {"a": mask}, {"a": {1: {0}}})


@pytest.fixture(scope="module")
def sample_truth(default_sample):
    masks, labels = load_cell_truth(default_sample)
    ids = sorted(masks)[:40]
    return {i: masks[i] for i in ids}, {i: labels[i] for i in ids}


def _perfect(masks, labels, transform=lambda cell_mask: cell_mask):
    return {
        image_id: [(transform(masks[image_id] == cell), vector) for cell, vector in labels[image_id].items()]
        for image_id in masks
    }


@pytest.mark.parametrize("reading", READINGS)
def test_perfect_predictions_score_one(sample_truth, reading):
    masks, labels = sample_truth
    assert sum(len(cells) for cells in labels.values()) > 100
    assert cell_map(_perfect(masks, labels), masks, labels, reading=reading) == pytest.approx(1.0)


def test_shuffled_labels_score_much_lower_when_every_class_counts(sample_truth):
    # Only the all-classes reading: the challenge reading drops a class an image lacks, and the default
    # sample's cells mostly carry their image's labels, so shuffling across images costs it little.
    masks, labels = sample_truth
    rng = np.random.default_rng(0)
    cells = [(image_id, cell) for image_id in labels for cell in labels[image_id]]
    vectors = [labels[i][c] for i, c in cells]
    order = rng.permutation(len(cells))
    shuffled = {image_id: {} for image_id in labels}
    for (image_id, cell), source in zip(cells, order):
        shuffled[image_id][cell] = vectors[source]
    score = cell_map(_perfect(masks, shuffled), masks, labels, reading="all_classes")
    assert score < 0.4


def test_eroded_masks_do_not_match(sample_truth):
    masks, labels = sample_truth

    # Keep only each cell's core (far from its edge): IoU with the full cell drops well under 0.6.
    def core(cell_mask):
        distance = ndimage.distance_transform_edt(cell_mask)
        return distance > 0.6 * distance.max()

    score = cell_map(_perfect(masks, labels, core), masks, labels)
    assert score == 0.0
    assert cell_map(_perfect(masks, labels, core), masks, labels, iou=0.05) == pytest.approx(1.0)


def test_scores_as_vectors_of_19(sample_truth):
    masks, labels = sample_truth
    first = sorted(masks)[0]
    predictions = {
        first: [(masks[first] == cell, np.asarray(vector) * 0.5 + 0.25) for cell, vector in labels[first].items()]
    }
    assert len(next(iter(predictions[first]))[1]) == N_CLASSES
    aps = cell_average_precisions(predictions, {first: masks[first]}, {first: labels[first]})
    assert all(ap == pytest.approx(1.0) for ap in aps if ap is not None)
