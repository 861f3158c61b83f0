"""The synthetic sample's stains: one green pattern per class (`PATTERNS`), and `render_image`, which draws
all four channels of an image whose cells carry given labels."""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage

from hpa_nb.core.labels import COLORS, N_CLASSES
from hpa_nb.sample.geometry import (
    STEP,
    Geometry,
    ellipse_points,
    in_cells,
    lines,
    make_geometry,
    points_by_nucleus,
    points_in_cytoplasm,
    points_in_nuclei,
    spots,
    walk,
)

Pattern = Callable[[Geometry, np.ndarray, np.random.Generator], np.ndarray]


def _nucleoplasm(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    fill = in_cells(g, carriers, g.nucleus) * (0.75 + 0.12 * g.texture)
    return fill - 0.5 * g.nucleoli_map * fill


def _nuclear_membrane(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    width = 1.3 * max(g.unit, 0.5) / g.na[g.owner]
    ring = np.exp(-(((g.nucleus_distance - 1.0) / width) ** 2))
    return ring * in_cells(g, carriers, g.inside)


def _nucleoli(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return g.nucleoli_map * in_cells(g, carriers, g.nucleus)


def _fibrillar_center(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    points = np.concatenate([g.nucleoli[i] for i in np.flatnonzero(carriers)])
    dots = np.repeat(points, 3, axis=0) + rng.normal(0, 1.3 * g.unit, (len(points) * 3, 2))
    return spots(g.size, dots[:, 0], dots[:, 1], 1.0, 0.7 * g.unit) * in_cells(g, carriers, g.nucleus)


def _nuclear_speckles(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ys, xs = points_in_nuclei(g, np.flatnonzero(carriers), (14, 28), 0.9, rng)
    speckles = spots(g.size, ys, xs, rng.uniform(0.5, 1.0, len(ys)), 1.0 * g.unit)
    return (speckles + 0.1) * in_cells(g, carriers, g.nucleus)


def _nuclear_bodies(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ys, xs = points_in_nuclei(g, np.flatnonzero(carriers), (1, 3), 0.7, rng)
    return spots(g.size, ys, xs, 1.0, 2.0 * g.unit) * in_cells(g, carriers, g.nucleus)


def _perinuclear_band(g: Geometry) -> np.ndarray:
    return np.exp(-(((g.nucleus_distance - 1.25) / 0.55) ** 2)) * (0.35 + g.reticulum)


def _endoplasmic_reticulum(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 0.8 * _perinuclear_band(g) * in_cells(g, carriers, g.cytoplasm)


def _golgi(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cells = np.flatnonzero(carriers)
    ys, xs = points_by_nucleus(g, cells, 0.25, rng)
    cluster = rng.integers(5, 10)
    ys = ys[:, None] + rng.normal(0, 2.5 * g.unit, (len(cells), cluster))
    xs = xs[:, None] + rng.normal(0, 2.5 * g.unit, (len(cells), cluster))
    return np.minimum(spots(g.size, ys, xs, 0.5, 1.8 * g.unit), 1.0) * in_cells(g, carriers, g.cytoplasm)


def _intermediate_filaments(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cells = np.repeat(np.flatnonzero(carriers), rng.integers(6, 11, int(carriers.sum())))
    n = len(cells)
    ys, xs = ellipse_points(
        g.cy[cells],
        g.cx[cells],
        g.a[cells],
        g.b[cells],
        g.theta[cells],
        rng.uniform(0.6, 0.95, n),
        rng.uniform(0, 2 * np.pi, n),
    )
    heading = np.arctan2(g.cy[cells] - ys, g.cx[cells] - xs) + rng.normal(0, 0.6, n)  # across the cell
    ys, xs, on = walk(
        ys,
        xs,
        heading,
        1.8 * g.a[cells],
        rng.normal(0, 1.2, n),
        rng.uniform(0.15, 0.35, n),
        rng.uniform(0.05, 0.12, n) / max(g.unit, 0.3),
        rng.uniform(0, 2 * np.pi, n),
    )
    return np.minimum(lines(g.size, ys, xs, on, 0.7, 0.7 * g.unit), 1.0) * in_cells(g, carriers, g.cytoplasm)


def _actin_filaments(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cells = np.flatnonzero(carriers)
    per_cell = rng.integers(8, 15, len(cells))
    index = np.repeat(cells, per_cell)
    angle = np.repeat(rng.uniform(0, np.pi, len(cells)), per_cell)  # one fibre direction per cell
    offset = rng.uniform(-1.0, 1.0, len(index)) * g.a[index]
    start_y = g.cy[index] + offset * np.cos(angle) - 1.2 * g.a[index] * np.sin(angle)
    start_x = g.cx[index] - offset * np.sin(angle) - 1.2 * g.a[index] * np.cos(angle)
    zeros = np.zeros(len(index))
    ys, xs, on = walk(start_y, start_x, angle, 2.4 * g.a[index], zeros, zeros, zeros, zeros)
    fibres = lines(g.size, ys, xs, on, 0.9, 0.6 * g.unit)
    near_edge = 0.25 + 0.75 * np.clip(g.cell_distance, 0, 1) ** 2  # stress fibres run along the cell edge
    return np.minimum(fibres, 1.0) * near_edge * in_cells(g, carriers, g.inside)


def _radial_lines(g: Geometry, cells: np.ndarray, count: tuple[int, int], rng: np.random.Generator):
    index = np.repeat(cells, rng.integers(count[0], count[1] + 1, len(cells)))
    n = len(index)
    heading = rng.uniform(0, 2 * np.pi, n)
    start = 0.3 * g.na[index]
    return walk(
        g.ny[index] + start * np.sin(heading),
        g.nx[index] + start * np.cos(heading),
        heading,
        1.2 * g.a[index],
        rng.normal(0, 0.5, n),
        rng.uniform(0, 0.12, n),
        rng.uniform(0.1, 0.3, n),
        rng.uniform(0, 2 * np.pi, n),
    )


def _microtubules(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ys, xs, on = _radial_lines(g, np.flatnonzero(carriers), (18, 28), rng)
    tubes = np.minimum(lines(g.size, ys, xs, on, 0.6, 0.5 * g.unit), 1.0)
    return tubes * (in_cells(g, carriers, g.cytoplasm) + 0.15 * in_cells(g, carriers, g.nucleus))


def _mitotic_spindle(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cells = np.flatnonzero(carriers)
    half = 0.9 * g.na[cells]
    width = 0.45 * g.na[cells]
    axis = rng.uniform(0, np.pi, len(cells))
    t = np.linspace(-1, 1, int(np.ceil(4 * half.max() / STEP)) + 2)
    bows = np.linspace(-1, 1, 9)
    # each arc runs pole to pole and bulges by bows*width at the equator: a bipolar spindle
    along = half[:, None, None] * t[None, None, :]
    across = width[:, None, None] * bows[None, :, None] * (1 - t[None, None, :] ** 2)
    cos, sin = np.cos(axis)[:, None, None], np.sin(axis)[:, None, None]
    ys = g.ny[cells][:, None, None] + along * sin + across * cos
    xs = g.nx[cells][:, None, None] + along * cos - across * sin
    arcs = lines(
        g.size,
        ys.reshape(len(cells) * len(bows), -1),
        xs.reshape(len(cells) * len(bows), -1),
        np.ones((len(cells) * len(bows), len(t))),
        0.45,
        0.5 * g.unit,
    )
    poles_y = np.concatenate([g.ny[cells] + half * np.sin(axis), g.ny[cells] - half * np.sin(axis)])
    poles_x = np.concatenate([g.nx[cells] + half * np.cos(axis), g.nx[cells] - half * np.cos(axis)])
    poles = spots(g.size, poles_y, poles_x, 1.0, 1.3 * g.unit)
    return np.minimum(arcs + poles, 1.0) * in_cells(g, carriers, g.inside)


def _centrosome(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cells = np.flatnonzero(carriers)
    ys, xs = points_by_nucleus(g, cells, 0.15, rng)
    pair = rng.random(len(cells)) < 0.5  # duplicated centrosomes before mitosis
    ys = np.concatenate([ys, ys[pair] + 2.5 * g.unit])
    xs = np.concatenate([xs, xs[pair] + 1.5 * g.unit])
    return spots(g.size, ys, xs, 1.0, 1.1 * g.unit) * in_cells(g, carriers, g.inside)


def _plasma_membrane(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    sigma = max(0.7, 0.8 * g.unit)
    ring = ndimage.gaussian_filter(g.boundary.astype(np.float32), sigma, truncate=3.0)
    return np.minimum(2.5 * sigma * ring, 1.0) * in_cells(g, carriers, g.inside)


def _mitochondria(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ys, xs, index = points_in_cytoplasm(g, np.flatnonzero(carriers), (40, 70), rng)
    n = len(ys)
    ys, xs, on = walk(
        ys,
        xs,
        rng.uniform(0, 2 * np.pi, n),
        rng.uniform(0.1, 0.2, n) * g.a[index],
        rng.normal(0, 1.0, n),
        np.zeros(n),
        np.zeros(n),
        np.zeros(n),
    )
    return np.minimum(lines(g.size, ys, xs, on, 0.8, 0.6 * g.unit), 1.0) * in_cells(g, carriers, g.cytoplasm)


def _aggresome(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ys, xs = points_by_nucleus(g, np.flatnonzero(carriers), 0.35, rng)
    return spots(g.size, ys, xs, 1.2, 4.5 * g.unit).clip(0, 1) * in_cells(g, carriers, g.inside)


def _cytosol(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return in_cells(g, carriers, g.cytoplasm) * (0.55 + 0.1 * g.texture)


def _vesicles(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ys, xs, _ = points_in_cytoplasm(g, np.flatnonzero(carriers), (30, 60), rng)
    dots = spots(g.size, ys, xs, rng.uniform(0.5, 1.0, len(ys)), 0.9 * g.unit)
    return dots * in_cells(g, carriers, g.cytoplasm)


def _negative(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.zeros((g.size, g.size), np.float32)


PATTERNS: tuple[Pattern, ...] = (
    _nucleoplasm,
    _nuclear_membrane,
    _nucleoli,
    _fibrillar_center,
    _nuclear_speckles,
    _nuclear_bodies,
    _endoplasmic_reticulum,
    _golgi,
    _intermediate_filaments,
    _actin_filaments,
    _microtubules,
    _mitotic_spindle,
    _centrosome,
    _plasma_membrane,
    _mitochondria,
    _aggresome,
    _cytosol,
    _vesicles,
    _negative,
)


def render_image(
    size: int, cell_labels: list[list[int]] | None, rng: np.random.Generator, geometry: Geometry | None = None
) -> tuple[dict[str, np.ndarray], Geometry]:
    """The four channels (float32, 0..1) of one image whose cells carry `cell_labels`."""
    g = geometry or make_geometry(size, rng)
    level = lambda low, high: rng.uniform(low, high, g.cells).astype(np.float32)[g.owner]  # noqa: E731  per cell
    ys, xs, on = _radial_lines(g, np.arange(g.cells), (22, 34), rng)
    red = np.minimum(lines(size, ys, xs, on, 0.35, 0.5 * g.unit), 1.0) * g.inside
    red = (red * (1 - 0.7 * g.nucleus) + (0.15 + 0.05 * g.texture) * g.cytoplasm) * level(0.6, 1.0)
    blue = g.nucleus * (0.6 + 0.12 * g.texture - 0.25 * g.nucleoli_map)
    blue = blue * level(0.7, 1.0)
    yellow = (0.7 * _perinuclear_band(g) + 0.1) * g.cytoplasm * level(0.6, 1.0)
    green = np.zeros((size, size), np.float32)
    for label in range(N_CLASSES):
        carriers = np.array([label in labels for labels in cell_labels or []], bool)
        if carriers.any():
            green += PATTERNS[label](g, carriers, rng)
    green = green * level(0.5, 1.0)  # protein expression varies from cell to cell
    sigma = max(0.5, 0.7 * g.unit)  # the microscope's blur
    channels = {}
    for color, signal in zip(COLORS, (red, green, blue, yellow)):
        signal = ndimage.gaussian_filter(np.asarray(signal, np.float32), sigma, truncate=3.0).clip(0, None)
        spread = np.sqrt(np.float32(0.04**2) * signal + np.float32(0.006**2))  # shot noise plus read noise
        noise = rng.standard_normal(signal.shape, np.float32) * spread
        channels[color] = (np.float32(0.03) + np.float32(0.8) * signal + noise).clip(0, 1)
    return channels, g
