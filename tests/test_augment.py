"""hpa_nb.data.augment: seeded and repeatable, channels stay aligned, values stay on 0–255, eagerly and in Dataset.map."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from hpa_nb.data.augment import STEPS, augment, preview_pairs  # noqa: E402

SIZE = 12


def spot_image(channels: int, row: int = 2, column: int = 9) -> np.ndarray:
    """One bright spot at the same place in every channel, on channel-specific dim backgrounds."""
    image = np.zeros((SIZE, SIZE, channels), np.float32)
    image[...] = 10.0 * (1 + np.arange(channels))
    image[row, column, :] = 200.0
    return image


def spot_positions(image: np.ndarray) -> set[tuple[int, int]]:
    return {np.unravel_index(np.argmax(image[..., c]), image.shape[:2]) for c in range(image.shape[-1])}


def augment_in_map(images: np.ndarray, seeds: list[tuple[int, int]]) -> list[np.ndarray]:
    dataset = tf.data.Dataset.from_tensor_slices((images, tf.constant(seeds, tf.int64)))
    return list(dataset.map(augment, num_parallel_calls=2).as_numpy_iterator())


@pytest.mark.parametrize("channels", [3, 4])
def test_same_seed_same_result_eagerly_and_in_dataset_map(channels):
    image = np.random.default_rng(0).uniform(0, 255, (SIZE, SIZE, channels)).astype(np.float32)
    seeds = [(5, i) for i in range(8)]
    eager = [augment(image, seed).numpy() for seed in seeds]
    mapped = augment_in_map(np.stack([image] * len(seeds)), seeds)
    for a, b, c in zip(eager, mapped, [augment(image, seed).numpy() for seed in seeds]):
        np.testing.assert_allclose(a, b, atol=1e-4)
        np.testing.assert_array_equal(a, c)
    assert len({a.tobytes() for a in eager}) == len(seeds), "different seeds should give different images"


@pytest.mark.parametrize("channels", [3, 4])
def test_channels_move_together_and_values_stay_in_range(channels):
    image = spot_image(channels)
    seeds = [(1, i) for i in range(40)]  # each corner has a 1/4 chance per seed: all four show up
    outputs = [augment(image, seed).numpy() for seed in seeds] + augment_in_map(np.stack([image] * 40), seeds)
    corners = set()
    for output in outputs:
        assert output.shape == image.shape and output.dtype == np.float32
        assert output.min() >= 0.0 and output.max() <= 255.0
        positions = spot_positions(output)
        assert len(positions) == 1, f"channels disagree on where the spot is: {positions}"
        corners |= positions
    # the 8 symmetries of the square move the spot around its orbit, and nowhere else
    assert corners == {(2, 9), (9, 2), (2, 2), (9, 9)}


def test_colour_jitter_is_per_channel_for_four_channels_and_saturation_for_three():
    flat3 = np.full((SIZE, SIZE, 3), 100.0, np.float32)
    for seed in range(6):  # grey stays grey under saturation; brightness/contrast move all channels alike
        out = augment(flat3, (0, seed)).numpy()
        assert np.ptp(out.reshape(-1, 3).mean(axis=0)) < 1e-3
    flat4 = np.full((SIZE, SIZE, 4), 100.0, np.float32)
    spreads = [np.ptp(augment(flat4, (0, seed)).numpy().reshape(-1, 4).mean(axis=0)) for seed in range(6)]
    assert max(spreads) > 1.0, "four stains should get independent gains"


def test_static_shape_survives_rot90_inside_a_batched_pipeline():
    images = np.zeros((4, SIZE, SIZE, 3), np.float32)
    dataset = tf.data.Dataset.from_tensor_slices(images).enumerate()
    dataset = dataset.map(lambda index, image: augment(image, tf.stack([tf.constant(0, tf.int64), index])))
    assert dataset.batch(2, drop_remainder=True).element_spec.shape == (2, SIZE, SIZE, 3)


def test_preview_pairs_returns_before_and_after_for_each_image():
    images = np.stack([spot_image(3), spot_image(3, 5, 5)])
    pairs = preview_pairs(images, seed=3)
    assert len(pairs) == 2
    np.testing.assert_array_equal(pairs[0][0], images[0])
    np.testing.assert_array_equal(pairs[0][1], preview_pairs(images, seed=3)[0][1])
    assert pairs[0][1].shape == images[0].shape


def test_each_step_alone_does_what_it_says_and_matches_its_part_of_the_chain():
    rng = np.random.default_rng(3)
    image = rng.uniform(0, 255, (16, 16, 3)).astype(np.float32)
    flips = {
        tuple(
            np.all(augment(image, (1, seed), ["flip left-right"]).numpy() == candidate)
            for candidate in (image, image[:, ::-1])
        )
        for seed in range(12)
    }
    assert flips == {(True, False), (False, True)}  # some seeds flip, some don't, nothing else happens
    turned = augment(image, (1, 5), ["rotate k·90°"]).numpy()
    assert any(np.array_equal(turned, np.rot90(image, k)) for k in range(4))
    geometric = ["flip left-right", "flip up-down", "rotate k·90°"]
    chain_geometry = augment(image, (2, 7), geometric).numpy()
    assert sorted(chain_geometry.ravel().tolist()) == sorted(image.ravel().tolist())  # a permutation only
    assert set(STEPS) >= set(geometric)


def test_an_unknown_step_is_a_clear_error():
    with pytest.raises(ValueError, match="sharpen"):
        augment(np.zeros((8, 8, 3), np.float32), 0, ["sharpen"])
