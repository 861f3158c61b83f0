"""Shared fixtures: small synthetic data sets in the competition layout, made once per session."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def small_sample(tmp_path_factory) -> Path:
    """40 training images at 64 px and 4 test images: fast enough for any test."""
    from hpa_nb.sample import write_sample

    root = tmp_path_factory.mktemp("small_sample")
    write_sample(root, images=40, size=64, seed=1, bit_depth=8, test_images=4, progress=False)
    return root


@pytest.fixture(scope="session")
def default_sample() -> Path:
    """The default sample that every command falls back to (cached under HPA_CACHE)."""
    from hpa_nb.env import ensure_default_sample

    return ensure_default_sample()
