"""The projection a long kernel prints from its first images, against a Kaggle session's limits."""

from __future__ import annotations

import pytest

from hpa_nb.core.budget import DiskBudgetError, Probe, Projection


def test_the_projection_counts_versions_and_disk_against_the_session():
    tiles = Projection("tiles", "image", 21806, 32, seconds_per_unit=1.0, bytes_per_unit=505e3, hours=5.0, max_gb=18.0)
    assert tiles.versions == 2  # 21,774 s still to go in versions of 5 h
    assert round(tiles.gb, 1) == 11.0
    line = tiles.line()
    assert line.startswith("projection: tiles, 1 s and 505 kB per image measured here, so the 21,806 images take 6.1 h")
    assert "at HOURS = 5 per version, 2 versions, each going on where the last stopped" in line
    assert line.endswith("11.0 GB of output against 18 GB")
    tiles.check_disk()
    with pytest.raises(DiskBudgetError, match="would need 11.0 GB, over the 10 GB budget"):
        Projection("tiles", "image", 21806, 0, 1.0, 505e3, max_gb=10.0).check_disk()
    assert Projection("training", "epoch", 20, 0, 1200.0, hours=8.0).versions == 1
    assert Projection("training", "epoch", 20, 5, 3600.0, hours=8.0).versions == 2  # 15 epochs of an hour left


def test_a_probe_projects_once_after_its_first_images(capsys):
    probe = Probe("shards", total=100, done=10, probe_images=4, max_gb=1.0)
    for images in range(1, 4):
        probe.update(images, images * 1e6)
    assert probe.projection is None and capsys.readouterr().err == ""
    probe.update(4, 4e6)
    assert probe.projection.total == 100 and probe.projection.done == 14
    assert probe.projection.bytes_per_unit == pytest.approx(1e6 * 4 / 14)  # the earlier versions' bytes were not given
    assert capsys.readouterr().err.startswith("projection: shards")
    probe.update(5, 5e6)
    assert capsys.readouterr().err == ""  # once
    probe.check(50, 50e6, done_bytes=10e6)  # 1 MB an image: 0.1 GB for the 100
    with pytest.raises(DiskBudgetError, match="the 100 images would need 1.7 GB, over the 1 GB budget"):
        probe.check(50, 1e9, done_bytes=0)
