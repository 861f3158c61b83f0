"""The synthetic sample's cells: where each cell, nucleus and nucleolus lies in an image (`make_geometry`),
and the drawing primitives the stains are made of (blurred spots, paths and lines)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


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


def ellipse_points(centre_y, centre_x, a, b, theta, rho, phi) -> tuple[np.ndarray, np.ndarray]:
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
        distances = _squared_distance(
            grid[None, :, None],
            grid[None, None, :],
            per_cell(cy),
            per_cell(cx),
            per_cell(a),
            per_cell(b),
            per_cell(theta),
        )
        owner = distances.argmin(axis=0)
        cell_distance = np.sqrt(np.take_along_axis(distances, owner[None], axis=0)[0])
        inside = cell_distance < 1.0 + 0.1 * wobble
        present = np.bincount(owner[inside], minlength=len(cy)) > 0
        if present.all():
            break
        cy, cx, a, b, theta, ny, nx, na, nb, ntheta = (
            value[present] for value in (cy, cx, a, b, theta, ny, nx, na, nb, ntheta)
        )
    cells = len(cy)
    # weighted Voronoi regions can leave a stray fragment of a cell elsewhere: keep each cell's largest piece
    labels = np.where(inside, owner + 1, 0)
    for index, window in enumerate(ndimage.find_objects(labels)):
        own = labels[window] == index + 1
        parts, count = ndimage.label(own)
        if count > 1:
            inside[window] &= ~own | (parts == np.bincount(parts.ravel())[1:].argmax() + 1)
    owned = lambda value: np.asarray(value, np.float32)[owner]  # noqa: E731  each pixel's own cell's value
    nucleus_distance = np.sqrt(
        _squared_distance(grid[:, None], grid[None, :], owned(ny), owned(nx), owned(na), owned(nb), owned(ntheta))
    )
    nucleus = inside & (nucleus_distance < 1.0 + 0.04 * wobble)
    labels = np.where(inside, owner + 1, 0)
    padded = np.pad(labels, 1, mode="edge")
    boundary = inside & (
        (padded[:-2, 1:-1] != labels)
        | (padded[2:, 1:-1] != labels)
        | (padded[1:-1, :-2] != labels)
        | (padded[1:-1, 2:] != labels)
    )
    texture = _smooth_noise(rng, size, max(1.0, 1.8 * unit))
    reticulum = np.exp(-((texture / 0.45) ** 2))  # zero crossings of smooth noise form a mesh
    nucleoli = []
    for i in range(cells):
        count = int(rng.integers(2, 5))
        rho, phi = np.sqrt(rng.uniform(0, 0.45, count)), rng.uniform(0, 2 * np.pi, count)
        nucleoli.append(np.stack(ellipse_points(ny[i], nx[i], na[i], nb[i], ntheta[i], rho, phi), axis=1))
    points = np.concatenate(nucleoli)
    nucleoli_map = spots(size, points[:, 0], points[:, 1], 1.0, NUCLEOLUS_SIGMA * unit)
    return Geometry(
        size,
        unit,
        cy,
        cx,
        a,
        b,
        theta,
        ny,
        nx,
        na,
        nb,
        ntheta,
        owner,
        inside,
        cell_distance,
        nucleus_distance,
        nucleus,
        inside & ~nucleus,
        boundary,
        texture,
        reticulum,
        nucleoli,
        nucleoli_map,
    )


def _splat(size: int, ys: np.ndarray, xs: np.ndarray, weights: np.ndarray, sigma: float) -> np.ndarray:
    """Sum weighted impulses at (ys, xs) into an image and blur them with a Gaussian."""
    iy, ix = np.rint(ys).astype(np.int64).ravel(), np.rint(xs).astype(np.int64).ravel()
    weights = np.broadcast_to(weights, ys.shape).ravel()
    keep = (iy >= 0) & (iy < size) & (ix >= 0) & (ix < size)
    flat = np.bincount(iy[keep] * size + ix[keep], weights=weights[keep], minlength=size * size)
    return ndimage.gaussian_filter(flat.reshape(size, size).astype(np.float32), sigma, truncate=3.0)


def spots(size: int, ys: np.ndarray, xs: np.ndarray, brightness, sigma: float) -> np.ndarray:
    """Gaussian spots whose peak height is `brightness`."""
    sigma = max(sigma, 0.6)
    return _splat(size, ys, xs, np.asarray(brightness, np.float64) * 2 * np.pi * sigma**2, sigma)


STEP = 0.5  # px between samples along a path
NUCLEOLUS_SIGMA = 2.6  # in Geometry.unit


def walk(
    start_y, start_x, heading, length, bend, wiggle, frequency, phase
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample points along paths (one per row): heading turns by `bend` over the length, plus a sinusoidal wiggle."""
    steps = int(np.ceil(np.max(length) / STEP)) + 1
    t = np.arange(steps, dtype=np.float64)[None] * STEP
    col = lambda value: np.asarray(value, np.float64).reshape(-1, 1)  # noqa: E731
    length = col(length)
    angle = col(heading) + col(bend) * t / length + col(wiggle) * np.sin(col(frequency) * t + col(phase))
    ys = col(start_y) + np.cumsum(STEP * np.sin(angle), axis=1) - STEP * np.sin(angle[:, :1])
    xs = col(start_x) + np.cumsum(STEP * np.cos(angle), axis=1) - STEP * np.cos(angle[:, :1])
    return ys, xs, (t <= length).astype(np.float64)


def lines(size: int, ys: np.ndarray, xs: np.ndarray, on: np.ndarray, brightness, sigma: float) -> np.ndarray:
    """Render sampled paths as lines whose peak height is about `brightness`."""
    sigma = max(sigma, 0.5)
    weight = np.asarray(brightness, np.float64).reshape(-1, 1) * np.sqrt(2 * np.pi) * sigma * STEP
    return _splat(size, ys, xs, on * weight, sigma)


def in_cells(geometry: Geometry, carriers: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Pixels of `region` that belong to a cell carrying the class."""
    return (region & carriers[geometry.owner]).astype(np.float32)


def points_in_nuclei(
    geometry: Geometry, cells: np.ndarray, count: tuple[int, int], reach: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random points inside the nuclei of `cells`, up to `reach` of the nuclear radius."""
    g = geometry
    per_cell = rng.integers(count[0], count[1] + 1, len(cells))
    index = np.repeat(cells, per_cell)
    rho, phi = reach * np.sqrt(rng.uniform(0, 1, len(index))), rng.uniform(0, 2 * np.pi, len(index))
    return ellipse_points(g.ny[index], g.nx[index], g.na[index], g.nb[index], g.ntheta[index], rho, phi)


def points_in_cytoplasm(
    geometry: Geometry, cells: np.ndarray, count: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random points between the nucleus and the edge of each of `cells` (and their cell index)."""
    g = geometry
    per_cell = rng.integers(count[0], count[1] + 1, len(cells))
    index = np.repeat(cells, per_cell)
    inner = g.na[index] / g.a[index]  # roughly where the nucleus ends
    rho = rng.uniform(inner + 0.1, 0.95)
    ys, xs = ellipse_points(
        g.cy[index], g.cx[index], g.a[index], g.b[index], g.theta[index], rho, rng.uniform(0, 2 * np.pi, len(index))
    )
    return ys, xs, index


def points_by_nucleus(
    geometry: Geometry, cells: np.ndarray, outside: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One point per cell just outside its nuclear rim (golgi, centrosome, aggresome sit there)."""
    g = geometry
    return ellipse_points(
        g.ny[cells],
        g.nx[cells],
        g.na[cells],
        g.nb[cells],
        g.ntheta[cells],
        1.0 + outside,
        rng.uniform(0, 2 * np.pi, len(cells)),
    )
