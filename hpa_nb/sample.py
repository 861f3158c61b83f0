"""An HPA-like synthetic data set in the exact competition layout, deterministic per seed.

Each image holds a few cells with a blue nucleus, red microtubules and yellow perinuclear ER;
the green channel shows a class-specific pattern for every label its cells carry. Besides the
competition files it writes ground truth for cell-level work: ``masks/{ID}.png`` (uint16
instance ids) and ``cells.csv`` (per-cell labels), plus ``sample.json`` (the parameters).
"""
from __future__ import annotations

import io
import json
import math
import shutil
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image
from scipy import ndimage

from hpa_nb.labels import COLORS, N_CLASSES, NEGATIVE

IMAGES_PER_TFRECORD = 30
SMALL_SIZE_SHARE = 0.3  # the real set mixes sizes too; most images are the large size
# Bump when the generator's output changes: the cached default sample is keyed by it, so a
# cache written by an older generator is never reused (its images would not match the notebooks).
GENERATOR_VERSION = 1
MARKER = "sample.json"  # marks a folder this module may overwrite

# Approximate images per class in the real train.csv (21,806 images): the sample keeps its skew.
REAL_CLASS_COUNTS = np.array(
    [8797, 1095, 2270, 1199, 1286, 2225, 660, 2112, 1224, 1106, 1061, 57, 1760, 3277, 2321, 270, 5748, 1861, 34],
    np.float64,
)
LABELS_PER_IMAGE = (1, 2, 3)
LABELS_PER_IMAGE_P = (0.5, 0.35, 0.15)
NEGATIVE_P = 0.02  # higher than real so Negative shows up without forcing in bigger samples


# --- labels -------------------------------------------------------------------------------
def min_class_count(images: int) -> int:
    """How often every class is guaranteed to appear among `images` training images."""
    return min(3, max(1, images // 40))


def _draw_label_set(rng: np.random.Generator, first: int | None) -> list[int]:
    """1–3 classes drawn with the real skew; Negative only ever alone."""
    if first == NEGATIVE or (first is None and rng.random() < NEGATIVE_P):
        return [NEGATIVE]
    count = int(rng.choice(LABELS_PER_IMAGE, p=LABELS_PER_IMAGE_P))
    chosen = [] if first is None else [first]
    weights = REAL_CLASS_COUNTS.copy()
    weights[NEGATIVE] = 0.0
    weights[chosen] = 0.0
    extra = rng.choice(N_CLASSES, size=count - len(chosen), replace=False, p=weights / weights.sum())
    labels = chosen + [int(c) for c in extra]
    rng.shuffle(labels)  # real train.csv labels come in no particular order ("8|5|0")
    return labels


def draw_labels(images: int, rng: np.random.Generator, guarantee: bool = True) -> list[list[int]]:
    """Label sets for `images` images; with `guarantee`, each class appears `min_class_count` times."""
    forced: list[int] = []
    if guarantee:
        rarest_first = [int(c) for c in np.argsort(REAL_CLASS_COUNTS, kind="stable")]
        forced = (rarest_first * min_class_count(images))[:images]
    sets = [_draw_label_set(rng, forced[i] if i < len(forced) else None) for i in range(images)]
    return [sets[i] for i in rng.permutation(images)]


def _cell_labels(image_labels: list[int], cells: int, rng: np.random.Generator) -> list[list[int]]:
    """Per-cell labels whose union is the image label: one cell carries all, others may carry a subset."""
    result = []
    for index in range(cells):
        labels = list(image_labels)
        if index > 0 and len(labels) > 1 and rng.random() < 0.3:
            labels.pop(int(rng.integers(len(labels))))
        result.append(labels)
    order = rng.permutation(cells)
    return [result[i] for i in order]


def _image_id(rng: np.random.Generator) -> str:
    """A uuid1-like ID such as the real ``5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0``."""
    hexes = rng.bytes(12).hex()
    return f"{hexes[:8]}-{hexes[8:12]}-11e8-{hexes[12:16]}-ac1f6b{hexes[16:22]}"


# --- cell geometry ------------------------------------------------------------------------
@dataclass
class Geometry:
    """Cells of one image: per-cell parameters and per-pixel maps derived from them."""

    size: int
    unit: float  # px per "typical" unit: spot and line widths scale with cell size
    cy: np.ndarray
    cx: np.ndarray
    a: np.ndarray  # cell semi-axes and orientation
    b: np.ndarray
    theta: np.ndarray
    ny: np.ndarray  # nucleus centre, semi-axes and orientation
    nx: np.ndarray
    na: np.ndarray
    nb: np.ndarray
    ntheta: np.ndarray
    owner: np.ndarray  # [S,S] index of the nearest cell (valid where `inside`)
    inside: np.ndarray  # [S,S] bool
    cell_distance: np.ndarray  # [S,S] normalised distance from the owner's centre (1 = its edge)
    nucleus_distance: np.ndarray  # [S,S] normalised distance from the owner's nucleus centre
    nucleus: np.ndarray  # [S,S] bool
    cytoplasm: np.ndarray  # [S,S] bool
    boundary: np.ndarray  # [S,S] bool, cell pixels touching another cell or background
    texture: np.ndarray  # [S,S] smooth noise, std 1
    reticulum: np.ndarray  # [S,S] 0..1 mesh-like ridges (ER)
    nucleoli: list[np.ndarray]  # per cell, [k,2] nucleolus centres (y, x)
    nucleoli_map: np.ndarray  # [S,S] every cell's nucleoli as spots of height 1

    @property
    def cells(self) -> int:
        return len(self.cy)

    def mask(self) -> np.ndarray:
        return np.where(self.inside, self.owner + 1, 0).astype(np.uint16)


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size), np.float32), sigma, mode="wrap", truncate=3.0)
    return noise / max(float(noise.std()), 1e-6)


def _ellipse_points(centre_y, centre_x, a, b, theta, rho, phi) -> tuple[np.ndarray, np.ndarray]:
    """Points at normalised radius `rho` and angle `phi` of rotated ellipses (broadcasting)."""
    u, v = rho * a * np.cos(phi), rho * b * np.sin(phi)
    return centre_y + u * np.sin(theta) + v * np.cos(theta), centre_x + u * np.cos(theta) - v * np.sin(theta)


def _waves(rng: np.random.Generator, size: int, wavelength: float, count: int = 6) -> np.ndarray:
    """Smooth random field (std about 1) from a few plane waves: far cheaper than blurring noise widely."""
    grid = np.arange(size, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi, count)
    frequency = 2 * np.pi / (wavelength * rng.uniform(0.7, 1.4, count))
    phase = rng.uniform(0, 2 * np.pi, count)
    field = np.zeros((size, size), np.float32)
    for k in range(count):
        ky, kx = np.float32(frequency[k] * np.sin(angle[k])), np.float32(frequency[k] * np.cos(angle[k]))
        field += np.sin(ky * grid[:, None] + kx * grid[None, :] + np.float32(phase[k]))
    return field * np.float32(math.sqrt(2 / count))


def _squared_distance(yy, xx, centre_y, centre_x, a, b, theta) -> np.ndarray:
    """Squared normalised distance from rotated ellipses' centres (1 = on the ellipse), float32."""
    f32 = lambda value: np.asarray(value, np.float32)  # noqa: E731  float64 would double the cost
    dy, dx = yy - f32(centre_y), xx - f32(centre_x)
    cos, sin = f32(np.cos(theta)), f32(np.sin(theta))
    u = (cos * dx + sin * dy) / f32(a)
    v = (cos * dy - sin * dx) / f32(b)
    return u * u + v * v


def _cell_count_range(size: int) -> tuple[int, int]:
    scale = size / 256
    low = max(2, round(4 * scale))
    return low, max(low + 1, round(9 * scale))


def make_geometry(size: int, rng: np.random.Generator) -> Geometry:
    """Place cells (elliptic seeds grown into a weighted Voronoi tessellation, clipped) and nuclei."""
    low, high = _cell_count_range(size)
    cells = int(rng.integers(low, high + 1))
    base = size * math.sqrt(0.7 / (cells * math.pi))
    radius = base * rng.uniform(0.8, 1.25, cells)
    centres: list[tuple[float, float]] = []
    for r in radius:  # a few rejection tries per cell keep cells apart; the tessellation resolves the rest
        for _ in range(30):
            y, x = rng.uniform(0.12 * size, 0.88 * size, 2)
            if all(math.hypot(y - py, x - px) > 0.75 * (r + pr) for (py, px), pr in zip(centres, radius)):
                break
        centres.append((float(y), float(x)))
    cy, cx = np.array(centres).T
    aspect = rng.uniform(1.0, 1.45, cells)
    theta = rng.uniform(0, np.pi, cells)
    a, b = radius * aspect, radius / aspect
    nuclear_radius = radius * rng.uniform(0.36, 0.48, cells)
    nuclear_aspect = rng.uniform(1.0, 1.3, cells)
    na, nb = nuclear_radius * nuclear_aspect, nuclear_radius / nuclear_aspect
    ntheta = theta + rng.normal(0, 0.3, cells)
    shift, shift_angle = radius * rng.uniform(0, 0.15, cells), rng.uniform(0, 2 * np.pi, cells)
    ny, nx = cy + shift * np.sin(shift_angle), cx + shift * np.cos(shift_angle)

    grid = np.arange(size, dtype=np.float32)
    per_cell = lambda value: value[:, None, None]  # noqa: E731
    unit = float(radius.mean()) / 45.0
    wobble = _waves(rng, size, 40 * unit)
    while True:  # a cell crowded out by its neighbours is dropped, so every cell id has pixels in the mask
        # separable coordinates (a column and a row) keep the [cells, S, S] work to a few operations
        distances = _squared_distance(grid[None, :, None], grid[None, None, :], per_cell(cy), per_cell(cx),
                                      per_cell(a), per_cell(b), per_cell(theta))
        owner = distances.argmin(axis=0)
        cell_distance = np.sqrt(np.take_along_axis(distances, owner[None], axis=0)[0])
        inside = cell_distance < 1.0 + 0.1 * wobble
        present = np.bincount(owner[inside], minlength=len(cy)) > 0
        if present.all():
            break
        cy, cx, a, b, theta, ny, nx, na, nb, ntheta = (
            value[present] for value in (cy, cx, a, b, theta, ny, nx, na, nb, ntheta))
    cells = len(cy)
    # weighted Voronoi regions can leave a stray fragment of a cell elsewhere: keep each cell's largest piece
    labels = np.where(inside, owner + 1, 0)
    for index, window in enumerate(ndimage.find_objects(labels)):
        own = labels[window] == index + 1
        parts, count = ndimage.label(own)
        if count > 1:
            inside[window] &= ~own | (parts == np.bincount(parts.ravel())[1:].argmax() + 1)
    owned = lambda value: np.asarray(value, np.float32)[owner]  # noqa: E731  each pixel's own cell's value
    nucleus_distance = np.sqrt(_squared_distance(grid[:, None], grid[None, :], owned(ny), owned(nx), owned(na),
                                                 owned(nb), owned(ntheta)))
    nucleus = inside & (nucleus_distance < 1.0 + 0.04 * wobble)
    labels = np.where(inside, owner + 1, 0)
    padded = np.pad(labels, 1, mode="edge")
    boundary = inside & ((padded[:-2, 1:-1] != labels) | (padded[2:, 1:-1] != labels)
                         | (padded[1:-1, :-2] != labels) | (padded[1:-1, 2:] != labels))
    texture = _smooth_noise(rng, size, max(1.0, 1.8 * unit))
    reticulum = np.exp(-((texture / 0.45) ** 2))  # zero crossings of smooth noise form a mesh
    nucleoli = []
    for i in range(cells):
        count = int(rng.integers(2, 5))
        rho, phi = np.sqrt(rng.uniform(0, 0.45, count)), rng.uniform(0, 2 * np.pi, count)
        nucleoli.append(np.stack(_ellipse_points(ny[i], nx[i], na[i], nb[i], ntheta[i], rho, phi), axis=1))
    points = np.concatenate(nucleoli)
    nucleoli_map = _spots(size, points[:, 0], points[:, 1], 1.0, NUCLEOLUS_SIGMA * unit)
    return Geometry(size, unit, cy, cx, a, b, theta, ny, nx, na, nb, ntheta, owner, inside, cell_distance,
                    nucleus_distance, nucleus, inside & ~nucleus, boundary, texture, reticulum, nucleoli, nucleoli_map)


# --- rendering primitives -----------------------------------------------------------------
def _splat(size: int, ys: np.ndarray, xs: np.ndarray, weights: np.ndarray, sigma: float) -> np.ndarray:
    """Sum weighted impulses at (ys, xs) into an image and blur them with a Gaussian."""
    iy, ix = np.rint(ys).astype(np.int64).ravel(), np.rint(xs).astype(np.int64).ravel()
    weights = np.broadcast_to(weights, ys.shape).ravel()
    keep = (iy >= 0) & (iy < size) & (ix >= 0) & (ix < size)
    flat = np.bincount(iy[keep] * size + ix[keep], weights=weights[keep], minlength=size * size)
    return ndimage.gaussian_filter(flat.reshape(size, size).astype(np.float32), sigma, truncate=3.0)


def _spots(size: int, ys: np.ndarray, xs: np.ndarray, brightness, sigma: float) -> np.ndarray:
    """Gaussian spots whose peak height is `brightness`."""
    sigma = max(sigma, 0.6)
    return _splat(size, ys, xs, np.asarray(brightness, np.float64) * 2 * np.pi * sigma**2, sigma)


STEP = 0.5  # px between samples along a path
NUCLEOLUS_SIGMA = 2.6  # in Geometry.unit


def _walk(start_y, start_x, heading, length, bend, wiggle, frequency, phase) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample points along paths (one per row): heading turns by `bend` over the length, plus a sinusoidal wiggle."""
    steps = int(np.ceil(np.max(length) / STEP)) + 1
    t = np.arange(steps, dtype=np.float64)[None] * STEP
    col = lambda value: np.asarray(value, np.float64).reshape(-1, 1)  # noqa: E731
    length = col(length)
    angle = col(heading) + col(bend) * t / length + col(wiggle) * np.sin(col(frequency) * t + col(phase))
    ys = col(start_y) + np.cumsum(STEP * np.sin(angle), axis=1) - STEP * np.sin(angle[:, :1])
    xs = col(start_x) + np.cumsum(STEP * np.cos(angle), axis=1) - STEP * np.cos(angle[:, :1])
    return ys, xs, (t <= length).astype(np.float64)


def _lines(size: int, ys: np.ndarray, xs: np.ndarray, on: np.ndarray, brightness, sigma: float) -> np.ndarray:
    """Render sampled paths as lines whose peak height is about `brightness`."""
    sigma = max(sigma, 0.5)
    weight = np.asarray(brightness, np.float64).reshape(-1, 1) * np.sqrt(2 * np.pi) * sigma * STEP
    return _splat(size, ys, xs, on * weight, sigma)


def _in_cells(geometry: Geometry, carriers: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Pixels of `region` that belong to a cell carrying the class."""
    return (region & carriers[geometry.owner]).astype(np.float32)


def _points_in_nuclei(geometry: Geometry, cells: np.ndarray, count: tuple[int, int], reach: float,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random points inside the nuclei of `cells`, up to `reach` of the nuclear radius."""
    g = geometry
    per_cell = rng.integers(count[0], count[1] + 1, len(cells))
    index = np.repeat(cells, per_cell)
    rho, phi = reach * np.sqrt(rng.uniform(0, 1, len(index))), rng.uniform(0, 2 * np.pi, len(index))
    return _ellipse_points(g.ny[index], g.nx[index], g.na[index], g.nb[index], g.ntheta[index], rho, phi)


def _points_in_cytoplasm(geometry: Geometry, cells: np.ndarray, count: tuple[int, int],
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random points between the nucleus and the edge of each of `cells` (and their cell index)."""
    g = geometry
    per_cell = rng.integers(count[0], count[1] + 1, len(cells))
    index = np.repeat(cells, per_cell)
    inner = (g.na[index] / g.a[index])  # roughly where the nucleus ends
    rho = rng.uniform(inner + 0.1, 0.95)
    ys, xs = _ellipse_points(g.cy[index], g.cx[index], g.a[index], g.b[index], g.theta[index], rho,
                             rng.uniform(0, 2 * np.pi, len(index)))
    return ys, xs, index


def _points_by_nucleus(geometry: Geometry, cells: np.ndarray, outside: float,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One point per cell just outside its nuclear rim (golgi, centrosome, aggresome sit there)."""
    g = geometry
    return _ellipse_points(g.ny[cells], g.nx[cells], g.na[cells], g.nb[cells], g.ntheta[cells],
                           1.0 + outside, rng.uniform(0, 2 * np.pi, len(cells)))


# --- green patterns, one per class ---------------------------------------------------------
Pattern = Callable[[Geometry, np.ndarray, np.random.Generator], np.ndarray]


def _nucleoplasm(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    fill = _in_cells(g, carriers, g.nucleus) * (0.75 + 0.12 * g.texture)
    return fill - 0.5 * g.nucleoli_map * fill


def _nuclear_membrane(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    width = 1.3 * max(g.unit, 0.5) / g.na[g.owner]
    ring = np.exp(-(((g.nucleus_distance - 1.0) / width) ** 2))
    return ring * _in_cells(g, carriers, g.inside)


def _nucleoli(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return g.nucleoli_map * _in_cells(g, carriers, g.nucleus)


def _fibrillar_center(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    points = np.concatenate([g.nucleoli[i] for i in np.flatnonzero(carriers)])
    dots = np.repeat(points, 3, axis=0) + rng.normal(0, 1.3 * g.unit, (len(points) * 3, 2))
    return _spots(g.size, dots[:, 0], dots[:, 1], 1.0, 0.7 * g.unit) * _in_cells(g, carriers, g.nucleus)


def _nuclear_speckles(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ys, xs = _points_in_nuclei(g, np.flatnonzero(carriers), (14, 28), 0.9, rng)
    speckles = _spots(g.size, ys, xs, rng.uniform(0.5, 1.0, len(ys)), 1.0 * g.unit)
    return (speckles + 0.1) * _in_cells(g, carriers, g.nucleus)


def _nuclear_bodies(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ys, xs = _points_in_nuclei(g, np.flatnonzero(carriers), (1, 3), 0.7, rng)
    return _spots(g.size, ys, xs, 1.0, 2.0 * g.unit) * _in_cells(g, carriers, g.nucleus)


def _perinuclear_band(g: Geometry) -> np.ndarray:
    return np.exp(-(((g.nucleus_distance - 1.25) / 0.55) ** 2)) * (0.35 + g.reticulum)


def _endoplasmic_reticulum(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 0.8 * _perinuclear_band(g) * _in_cells(g, carriers, g.cytoplasm)


def _golgi(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cells = np.flatnonzero(carriers)
    ys, xs = _points_by_nucleus(g, cells, 0.25, rng)
    cluster = rng.integers(5, 10)
    ys = ys[:, None] + rng.normal(0, 2.5 * g.unit, (len(cells), cluster))
    xs = xs[:, None] + rng.normal(0, 2.5 * g.unit, (len(cells), cluster))
    return np.minimum(_spots(g.size, ys, xs, 0.5, 1.8 * g.unit), 1.0) * _in_cells(g, carriers, g.cytoplasm)


def _intermediate_filaments(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cells = np.repeat(np.flatnonzero(carriers), rng.integers(6, 11, int(carriers.sum())))
    n = len(cells)
    ys, xs = _ellipse_points(g.cy[cells], g.cx[cells], g.a[cells], g.b[cells], g.theta[cells],
                             rng.uniform(0.6, 0.95, n), rng.uniform(0, 2 * np.pi, n))
    heading = np.arctan2(g.cy[cells] - ys, g.cx[cells] - xs) + rng.normal(0, 0.6, n)  # across the cell
    ys, xs, on = _walk(ys, xs, heading, 1.8 * g.a[cells], rng.normal(0, 1.2, n), rng.uniform(0.15, 0.35, n),
                       rng.uniform(0.05, 0.12, n) / max(g.unit, 0.3), rng.uniform(0, 2 * np.pi, n))
    return np.minimum(_lines(g.size, ys, xs, on, 0.7, 0.7 * g.unit), 1.0) * _in_cells(g, carriers, g.cytoplasm)


def _actin_filaments(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cells = np.flatnonzero(carriers)
    per_cell = rng.integers(8, 15, len(cells))
    index = np.repeat(cells, per_cell)
    angle = np.repeat(rng.uniform(0, np.pi, len(cells)), per_cell)  # one fibre direction per cell
    offset = rng.uniform(-1.0, 1.0, len(index)) * g.a[index]
    start_y = g.cy[index] + offset * np.cos(angle) - 1.2 * g.a[index] * np.sin(angle)
    start_x = g.cx[index] - offset * np.sin(angle) - 1.2 * g.a[index] * np.cos(angle)
    zeros = np.zeros(len(index))
    ys, xs, on = _walk(start_y, start_x, angle, 2.4 * g.a[index], zeros, zeros, zeros, zeros)
    fibres = _lines(g.size, ys, xs, on, 0.9, 0.6 * g.unit)
    near_edge = 0.25 + 0.75 * np.clip(g.cell_distance, 0, 1) ** 2  # stress fibres run along the cell edge
    return np.minimum(fibres, 1.0) * near_edge * _in_cells(g, carriers, g.inside)


def _radial_lines(g: Geometry, cells: np.ndarray, count: tuple[int, int], rng: np.random.Generator):
    index = np.repeat(cells, rng.integers(count[0], count[1] + 1, len(cells)))
    n = len(index)
    heading = rng.uniform(0, 2 * np.pi, n)
    start = 0.3 * g.na[index]
    return _walk(g.ny[index] + start * np.sin(heading), g.nx[index] + start * np.cos(heading), heading,
                 1.2 * g.a[index], rng.normal(0, 0.5, n), rng.uniform(0, 0.12, n), rng.uniform(0.1, 0.3, n),
                 rng.uniform(0, 2 * np.pi, n))


def _microtubules(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ys, xs, on = _radial_lines(g, np.flatnonzero(carriers), (18, 28), rng)
    tubes = np.minimum(_lines(g.size, ys, xs, on, 0.6, 0.5 * g.unit), 1.0)
    return tubes * (_in_cells(g, carriers, g.cytoplasm) + 0.15 * _in_cells(g, carriers, g.nucleus))


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
    arcs = _lines(g.size, ys.reshape(len(cells) * len(bows), -1), xs.reshape(len(cells) * len(bows), -1),
                  np.ones((len(cells) * len(bows), len(t))), 0.45, 0.5 * g.unit)
    poles_y = np.concatenate([g.ny[cells] + half * np.sin(axis), g.ny[cells] - half * np.sin(axis)])
    poles_x = np.concatenate([g.nx[cells] + half * np.cos(axis), g.nx[cells] - half * np.cos(axis)])
    poles = _spots(g.size, poles_y, poles_x, 1.0, 1.3 * g.unit)
    return np.minimum(arcs + poles, 1.0) * _in_cells(g, carriers, g.inside)


def _centrosome(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cells = np.flatnonzero(carriers)
    ys, xs = _points_by_nucleus(g, cells, 0.15, rng)
    pair = rng.random(len(cells)) < 0.5  # duplicated centrosomes before mitosis
    ys = np.concatenate([ys, ys[pair] + 2.5 * g.unit])
    xs = np.concatenate([xs, xs[pair] + 1.5 * g.unit])
    return _spots(g.size, ys, xs, 1.0, 1.1 * g.unit) * _in_cells(g, carriers, g.inside)


def _plasma_membrane(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    sigma = max(0.7, 0.8 * g.unit)
    ring = ndimage.gaussian_filter(g.boundary.astype(np.float32), sigma, truncate=3.0)
    return np.minimum(2.5 * sigma * ring, 1.0) * _in_cells(g, carriers, g.inside)


def _mitochondria(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ys, xs, index = _points_in_cytoplasm(g, np.flatnonzero(carriers), (40, 70), rng)
    n = len(ys)
    ys, xs, on = _walk(ys, xs, rng.uniform(0, 2 * np.pi, n), rng.uniform(0.1, 0.2, n) * g.a[index],
                       rng.normal(0, 1.0, n), np.zeros(n), np.zeros(n), np.zeros(n))
    return np.minimum(_lines(g.size, ys, xs, on, 0.8, 0.6 * g.unit), 1.0) * _in_cells(g, carriers, g.cytoplasm)


def _aggresome(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ys, xs = _points_by_nucleus(g, np.flatnonzero(carriers), 0.35, rng)
    return _spots(g.size, ys, xs, 1.2, 4.5 * g.unit).clip(0, 1) * _in_cells(g, carriers, g.inside)


def _cytosol(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _in_cells(g, carriers, g.cytoplasm) * (0.55 + 0.1 * g.texture)


def _vesicles(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ys, xs, _ = _points_in_cytoplasm(g, np.flatnonzero(carriers), (30, 60), rng)
    dots = _spots(g.size, ys, xs, rng.uniform(0.5, 1.0, len(ys)), 0.9 * g.unit)
    return dots * _in_cells(g, carriers, g.cytoplasm)


def _negative(g: Geometry, carriers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.zeros((g.size, g.size), np.float32)


PATTERNS: tuple[Pattern, ...] = (
    _nucleoplasm, _nuclear_membrane, _nucleoli, _fibrillar_center, _nuclear_speckles, _nuclear_bodies,
    _endoplasmic_reticulum, _golgi, _intermediate_filaments, _actin_filaments, _microtubules,
    _mitotic_spindle, _centrosome, _plasma_membrane, _mitochondria, _aggresome, _cytosol, _vesicles, _negative,
)


# --- one image ----------------------------------------------------------------------------
def render_image(size: int, cell_labels: list[list[int]] | None, rng: np.random.Generator,
                 geometry: Geometry | None = None) -> tuple[dict[str, np.ndarray], Geometry]:
    """The four channels (float32, 0..1) of one image whose cells carry `cell_labels`."""
    g = geometry or make_geometry(size, rng)
    level = lambda low, high: rng.uniform(low, high, g.cells).astype(np.float32)[g.owner]  # noqa: E731  per cell
    ys, xs, on = _radial_lines(g, np.arange(g.cells), (22, 34), rng)
    red = np.minimum(_lines(size, ys, xs, on, 0.35, 0.5 * g.unit), 1.0) * g.inside
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


# --- files --------------------------------------------------------------------------------
def _png(array: np.ndarray, mask: bool = False) -> bytes:
    buffer = io.BytesIO()
    # Noisy microscopy barely compresses beyond Huffman coding, which is also the fastest; masks are flat, so deflate
    options = {"compress_level": 6} if mask else {"compress_level": 1, "compress_type": zlib.Z_HUFFMAN_ONLY}
    Image.fromarray(array).save(buffer, format="PNG", **options)
    return buffer.getvalue()


def _quantise(channel: np.ndarray, bit_depth: int) -> np.ndarray:
    top, dtype = (255, np.uint8) if bit_depth == 8 else (65535, np.uint16)
    return np.rint(channel * top).astype(dtype)


def _small_size(size: int) -> int:
    return max(8, int(round(size * 2 / 3 / 8)) * 8)


@dataclass
class _Plan:
    image_id: str
    labels: list[int]
    size: int
    split: str  # "train" or "test"
    index: int


def _plans(images: int, test_images: int, size: int, seed: int) -> list[_Plan]:
    rng = np.random.default_rng([seed, 0])
    ids: list[str] = []
    while len(ids) < images + test_images:
        candidate = _image_id(rng)
        if candidate not in ids:
            ids.append(candidate)
    train_labels = draw_labels(images, rng, guarantee=True)
    test_labels = draw_labels(test_images, rng, guarantee=False)
    sizes = np.where(rng.random(images + test_images) < SMALL_SIZE_SHARE, _small_size(size), size)
    plans = [_Plan(ids[i], train_labels[i], int(sizes[i]), "train", i) for i in range(images)]
    plans += [_Plan(ids[images + i], test_labels[i], int(sizes[images + i]), "test", i) for i in range(test_images)]
    return plans


def _tfrecord_name(index: int, files: int) -> str:
    return f"train-{index:03d}-of-{files:03d}.tfrec"


def _prepare(out: Path) -> None:
    """Create `out`; only a folder holding a previous sample (its marker) may be overwritten."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise FileExistsError(f"{out} is not empty and holds no {MARKER}: refusing to overwrite it")
        for name in ("train", "test", "train_tfrecords", "masks"):
            shutil.rmtree(out / name, ignore_errors=True)
    for name in ("train", "test", "train_tfrecords", "masks"):
        (out / name).mkdir(parents=True, exist_ok=True)


def _validate(images: int, size: int, bit_depth: int, test_images: int) -> None:
    if images < 1:
        raise ValueError(f"images must be at least 1, got {images}")
    if test_images < 0:
        raise ValueError(f"test_images must be at least 0, got {test_images}")
    if size < 32:
        raise ValueError(f"size must be at least 32 px, got {size}")
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")


def _records(plan: _Plan, pngs: dict[str, bytes], rng: np.random.Generator) -> Iterator[bytes]:
    """The image's four serialized tf.train.Examples, colours in a per-image shuffled order."""
    import tensorflow as tf

    target = "|".join(str(label) for label in plan.labels).encode()
    for color_index in rng.permutation(len(COLORS)):
        color = COLORS[color_index]
        feature = {
            "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[pngs[color]])),
            "image_name": tf.train.Feature(bytes_list=tf.train.BytesList(value=[f"{plan.image_id}_{color}".encode()])),
            "target": tf.train.Feature(bytes_list=tf.train.BytesList(value=[target])),
        }
        example = tf.train.Example(features=tf.train.Features(feature=feature))
        yield example.SerializeToString(deterministic=True)  # sorted map keys: byte-identical reruns


def _write_csv(path: Path, header: str, rows: list[str]) -> None:
    path.write_text("\n".join([header, *rows]) + "\n")


def write_sample(out: str | Path, images: int = 240, size: int = 256, seed: int = 0, bit_depth: int = 8,
                 test_images: int = 16, progress: bool = True) -> Path:
    """Write an HPA-like synthetic data set in the competition layout into `out` and return it.

    Files: ``train.csv``, ``train/{ID}_{color}.png``, ``train_tfrecords/train-NNN-of-MMM.tfrec``
    (an image's four records contiguous, colour order shuffled per image), ``test/`` PNGs,
    ``sample_submission.csv``, plus ground truth for cell-level work: ``masks/{ID}.png`` (uint16
    instance ids, train and test) and ``cells.csv`` (ID, CellID, Label for train and test cells).
    Images are square, `size` px or about two thirds of it, 8- or 16-bit greyscale PNGs.
    Every class appears at least ``min_class_count(images)`` times; Negative never comes with another
    label. The same arguments give byte-identical files.
    """
    _validate(images, size, bit_depth, test_images)  # before the slow TensorFlow import: bad input answers at once
    import tensorflow as tf
    from tqdm import tqdm  # plain text bars: the same in a terminal, a notebook and a Kaggle log

    out = Path(out)
    _prepare(out)
    plans = _plans(images, test_images, size, seed)
    per_file = math.ceil(images / max(1, math.ceil(images / IMAGES_PER_TFRECORD)))  # even files of <= 30
    files = math.ceil(images / per_file)
    train_rows, cell_rows, submission_rows = [], [], []
    writer = None
    bar = tqdm(total=len(plans), desc="sample", unit="img", file=sys.stderr, disable=not (progress and images >= 50))
    try:
        for plan in plans:
            rng = np.random.default_rng([seed, 1 if plan.split == "train" else 2, plan.index])
            geometry = make_geometry(plan.size, rng)
            cell_labels = _cell_labels(plan.labels, geometry.cells, rng)
            channels, _ = render_image(plan.size, cell_labels, rng, geometry)
            pngs = {color: _png(_quantise(channels[color], bit_depth)) for color in COLORS}
            for color in COLORS:
                (out / plan.split / f"{plan.image_id}_{color}.png").write_bytes(pngs[color])
            (out / "masks" / f"{plan.image_id}.png").write_bytes(_png(geometry.mask(), mask=True))
            label_text = "|".join(str(label) for label in plan.labels)
            cell_rows += [f"{plan.image_id},{i + 1},{'|'.join(map(str, labels))}" for i, labels in enumerate(cell_labels)]
            if plan.split == "train":
                train_rows.append(f"{plan.image_id},{label_text}")
                if plan.index % per_file == 0:
                    if writer is not None:
                        writer.close()
                    path = out / "train_tfrecords" / _tfrecord_name(plan.index // per_file, files)
                    writer = tf.io.TFRecordWriter(str(path))
                for record in _records(plan, pngs, rng):
                    writer.write(record)
            else:
                submission_rows.append(f"{plan.image_id},{plan.size},{plan.size},")
            bar.update()
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    _write_csv(out / "train.csv", "ID,Label", train_rows)
    _write_csv(out / "cells.csv", "ID,CellID,Label", cell_rows)
    _write_csv(out / "sample_submission.csv", "ID,ImageWidth,ImageHeight,PredictionString", submission_rows)
    spec = {"images": images, "size": size, "seed": seed, "bit_depth": bit_depth, "test_images": test_images}
    (out / MARKER).write_text(json.dumps(spec, indent=1, sort_keys=True) + "\n")
    return out
