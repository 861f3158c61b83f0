"""A Kaggle session's limits, and the projection a long kernel prints before it commits to the long part.

A long kernel (shards, tiles, training) measures its cost per image on its first images, projects the
whole job from it against the version's time (``HOURS``, under Kaggle's 9 h for a TPU session and 12 h
for a CPU one) and its disk budget (``MAX_GB``, under the 20 GB of ``/kaggle/working``), and says in one
line how long it takes, how many versions that is (each goes on where the last stopped), and how much of
``/kaggle/working`` it fills. Where the disk cannot hold the output, it stops before
writing more (`DiskBudgetError`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

PROBE_IMAGES = 32  # the first images whose cost the projection is made from


class DiskBudgetError(ValueError):
    """The output would not fit in the disk budget (Kaggle's /kaggle/working holds 20 GB)."""


def _hours(seconds: float) -> str:
    return (
        f"{seconds / 3600:.1f} h"
        if seconds >= 3600
        else f"{seconds / 60:.0f} min"
        if seconds >= 60
        else f"{seconds:.0f} s"
    )


@dataclass(frozen=True)
class Projection:
    """The whole job projected from what its first units cost."""

    what: str  # "shards", "tiles", "training"
    unit: str  # "image", "epoch"
    total: int  # units in all
    done: int  # units finished by earlier versions or earlier in this one
    seconds_per_unit: float
    bytes_per_unit: float = 0.0
    hours: float | None = None  # the version's time budget (HOURS); None: no deadline
    max_gb: float | None = None

    @property
    def seconds_left(self) -> float:
        return max(0, self.total - self.done) * self.seconds_per_unit

    @property
    def gb(self) -> float:
        return self.total * self.bytes_per_unit / 1e9

    @property
    def versions(self) -> int:
        """Versions of ``hours`` each that the rest takes (1 without a deadline)."""
        if not self.hours:
            return 1
        return max(1, math.ceil(self.seconds_left / (self.hours * 3600)))

    def line(self) -> str:
        cost = f"{self.seconds_per_unit:.3g} s" + (
            f" and {self.bytes_per_unit / 1e3:.0f} kB" if self.bytes_per_unit else ""
        )
        text = (
            f"projection: {self.what}, {cost} per {self.unit} measured here, so the {self.total:,} {self.unit}s "
            f"take {_hours(self.total * self.seconds_per_unit)} in all"
            + (f" ({_hours(self.seconds_left)} still to go)" if self.done else "")
        )
        if self.hours:
            text += f"; at HOURS = {self.hours:g} per version, {self.versions} version" + (
                "" if self.versions == 1 else "s, each going on where the last stopped"
            )
        if self.bytes_per_unit:
            text += f"; {self.gb:.1f} GB of output" + (f" against {self.max_gb:g} GB" if self.max_gb else "")
        return text

    def check_disk(self) -> None:
        if self.max_gb is not None and self.bytes_per_unit and self.gb > self.max_gb:
            raise DiskBudgetError(
                f"{self.what}: {self.bytes_per_unit / 1e3:.0f} kB per {self.unit}, so the {self.total:,} {self.unit}s "
                f"would need {self.gb:.1f} GB, over the {self.max_gb:g} GB budget"
            )


class Probe:
    """Times a writer's first `PROBE_IMAGES` images, then prints the `Projection` and checks the disk once;
    `check` re-checks the disk from the bytes written so far (after every finished file)."""

    def __init__(
        self,
        what: str,
        total: int | None,
        done: int,
        hours: float | None = None,
        max_gb: float | None = None,
        probe_images: int = PROBE_IMAGES,
    ) -> None:
        self.what, self.total, self.done, self.hours, self.max_gb = what, total, done, hours, max_gb
        self.probe_images = probe_images
        self.started, self.projection = time.perf_counter(), None

    def _projection(self, images: int, written_bytes: float, done_bytes: float) -> Projection:
        seconds = (time.perf_counter() - self.started) / images
        per_image = (done_bytes + written_bytes) / (self.done + images)
        return Projection(
            self.what,
            "image",
            self.total or self.done + images,
            self.done + images,
            seconds,
            per_image,
            self.hours,
            self.max_gb,
        )

    def update(self, images: int, written_bytes: float, done_bytes: float = 0.0) -> None:
        """`images` written in this run so far, `written_bytes` of them, and the earlier runs' `done_bytes`."""
        remaining = self.total - self.done if self.total else None
        threshold = self.probe_images if remaining is None else min(self.probe_images, max(1, remaining))
        if self.projection is None and images >= threshold:
            self.projection = self._projection(images, written_bytes, done_bytes)
            logger.info(self.projection.line())
            self.projection.check_disk()

    def check(self, images: int, written_bytes: float, done_bytes: float = 0.0) -> None:
        if images and self.total:
            self._projection(images, written_bytes, done_bytes).check_disk()
