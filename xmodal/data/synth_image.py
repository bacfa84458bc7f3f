"""Bright-field crops rendered from the particle latents, vectorised over particles.

Real CytoSense crops (Cefas export) are dark, partly transparent particles on a light-gray background
(~186 of 255) with a thin bright halo at the edges; crops are square and grow with the particle. The
renderer follows that: an approximate signed-distance field of the union of elliptical cells gives
body darkness, a dark rim and a bright halo; hollow cells are lighter inside; texture modulates the
body; thin spines are dark line segments; then illumination gradient, debris specks, Gaussian blur
and pixel noise. Blur is applied to the edge profile (``edge_lut``) rather than as a 2-D
convolution. The image x axis is the flow axis.

The SYKE layout's crops also carry the instrument software's scale-bar band on top
(``scale_bar_header``, 25 px like the SYKE dataset's exports); ``xmodal ingest`` finds and cuts it.

Speed: every per-pixel step is a handful of float32 array operations over a batch of equal-size
crops; particles are sorted by cell count so that the batch for cell k is a prefix (a view, no copy).
"""

from __future__ import annotations

import functools

import numpy as np

from xmodal.data.synth_latents import Latents
from xmodal.data.synth_species import DomainStyle

MIN_IMAGE_SIZE = 16  # px: the smallest image_size synth accepts (the coarsest pixel pitch)
MIN_SIDE_FRACTION = 4  # the smallest crop is image_size // 4 px
MARGIN_PX = 5.0  # background kept around the particle's bounding box
BATCH = 64  # crops rendered together (keeps the working arrays in cache)
_TEX_CELL = 4  # texture grain in px
_F = np.float32
_LUT_STEP = 0.25  # px of signed distance per edge-profile entry
LUT_SD = np.arange(-8.0, 8.0 + _LUT_STEP / 2, _LUT_STEP)  # distances tabulated by edge_lut


def _col(v) -> np.ndarray:
    """Per-crop values as a float32 (n, 1, 1) column that broadcasts over the crop's pixels."""
    return np.asarray(v, dtype=_F)[:, None, None]


def um_per_px(image_size: int) -> float:
    """Pixel pitch: a 64-px crop spans 32 µm; larger particles are shown shrunk into the largest crop."""
    return 32.0 / image_size


def _world(lat: Latents) -> tuple[np.ndarray, np.ndarray]:
    """Cell centres in the image frame (µm): x along the flow, y across it."""
    c, s = np.cos(lat.theta)[:, None], np.sin(lat.theta)[:, None]
    return lat.cu * c - lat.cv * s, lat.cu * s + lat.cv * c


def crop_geometry(lat: Latents, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per particle: square crop side (px, multiple of 8) and effective µm per px."""
    x, y = _world(lat)
    valid = np.arange(lat.cu.shape[1])[None, :] < lat.n_cells[:, None]
    half = np.where(valid, np.maximum(np.abs(x), np.abs(y)) + lat.ca, 0.0).max(axis=1)
    half = np.maximum(half, np.where(lat.spines > 0, lat.ca[:, 0] + lat.spine_len, 0.0))
    base = um_per_px(image_size)
    need = 2.0 * half / base + 2.0 * MARGIN_PX
    side = np.clip(np.ceil(need / 8.0) * 8.0, max(8, image_size // MIN_SIDE_FRACTION), image_size)
    scale = base * np.maximum(1.0, need / image_size)
    return side.astype(np.int64), scale


def _phi(x: np.ndarray) -> np.ndarray:
    """Standard normal CDF (tanh approximation, |error| < 2e-4; numpy has no erf)."""
    return 0.5 * (1.0 + np.tanh(0.7978845608 * (x + 0.044715 * x**3)))


def edge_lut(opacity: np.ndarray, blur: np.ndarray) -> np.ndarray:
    """Darkness as a function of signed distance (px) to the particle edge, one row per particle.

    The sharp profile (opaque body for d < 0, a dark wall |d| < 0.75, a bright diffraction halo for
    1 < d < 3) convolved with the particle's Gaussian blur along the distance axis — the exact blur of
    a straight edge — so the crops need no 2-D convolution. Negative darkness is the halo.
    """
    s = LUT_SD[None, :] / blur[:, None]
    band = lambda lo, hi: _phi(s - lo / blur[:, None]) - _phi(s - hi / blur[:, None])  # noqa: E731
    lut = opacity[:, None] * (1.0 - _phi(s)) + 0.3 * band(-0.75, 0.75) - 0.2 * band(1.0, 3.0)
    return lut.astype(_F)


def _texture(n: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth random granularity: coarse Gaussian noise bilinearly upsampled to the crop."""
    g = side // _TEX_CELL + 2
    coarse = rng.standard_normal((n, g, g), dtype=_F)
    pos = np.arange(side) / _TEX_CELL
    hat = np.maximum(0.0, 1.0 - np.abs(pos[:, None] - np.arange(g)[None, :]))  # (side, g) weights
    up = hat.astype(_F)
    return up @ coarse @ up.T


def _quad(lat: Latents, j: np.ndarray, k: int, scale: np.ndarray) -> tuple[np.ndarray, ...]:
    """Coefficients of q(dx, dy) = qa·dx² + qb·dx·dy + qc·dy² − hb = b/2·(r² − 1) for cell k (px).

    r is the normalised elliptic radius, so q equals the distance to the boundary near it and is
    −b/2 at the centre: a signed-distance approximation that needs no square root.
    """
    phi = lat.theta[j] + lat.crot[j, k]
    cp, sp = np.cos(phi), np.sin(phi)
    ia2, ib2 = (scale / lat.ca[j, k]) ** 2, (scale / lat.cb[j, k]) ** 2
    hb = 0.5 * lat.cb[j, k] / scale
    return (
        hb * (cp * cp * ia2 + sp * sp * ib2),
        2.0 * hb * cp * sp * (ia2 - ib2),
        hb * (sp * sp * ia2 + cp * cp * ib2),
        hb,
    )


def _field_uniform(lat, idx, scale, gx, gy, world, sd: np.ndarray) -> None:
    """``sd`` for particles whose cells share one shape: q_k(p) = Q(p) + (linear in p)_k, so the
    union needs only the min over cheap per-cell planes (2 array ops per cell instead of 4)."""
    qa, qb, qc, hb = _quad(lat, idx, 0, scale)
    best = np.full(sd.shape, np.inf, dtype=_F)
    plane = np.empty_like(best)  # reused: a fresh 1-MB temporary per cell costs more than the maths
    ncell = lat.n_cells[idx]
    for k in range(int(ncell[0])):
        m = int(np.count_nonzero(ncell > k))
        j = idx[:m]
        xk, yk = world[0][j, k] / scale[:m], world[1][j, k] / scale[:m]
        alpha = -2.0 * qa[:m] * xk - qb[:m] * yk
        beta = -qb[:m] * xk - 2.0 * qc[:m] * yk
        gamma = qa[:m] * xk * xk + qb[:m] * xk * yk + qc[:m] * yk * yk
        np.add(_col(alpha) * gx[:m] + _col(gamma), _col(beta) * gy[:m], out=plane[:m])
        np.minimum(best[:m], plane[:m], out=best[:m])
    sd[:] = (_col(qb) * gx) * gy
    sd += _col(qa) * gx * gx
    sd += _col(qc) * gy * gy - _col(hb)
    sd += best


def _field_general(lat, idx, scale, gx, gy, world, sd: np.ndarray) -> None:
    """``sd`` for particles whose cells differ in size or rotation (detritus): cell by cell."""
    sd[:] = np.inf
    ncell = lat.n_cells[idx]
    for k in range(int(ncell[0])):
        m = int(np.count_nonzero(ncell > k))
        j = idx[:m]
        qa, qb, qc, hb = _quad(lat, j, k, scale[:m])
        dx = gx[:m] - _col(world[0][j, k] / scale[:m])
        dy = gy[:m] - _col(world[1][j, k] / scale[:m])
        q = (_col(qb) * dx) * dy
        q += _col(qa) * dx * dx
        q += _col(qc) * dy * dy - _col(hb)
        np.minimum(sd[:m], q, out=sd[:m])


def _cells_field(lat: Latents, idx: np.ndarray, scale: np.ndarray, gx: np.ndarray, gy: np.ndarray, world):
    """Approximate signed distance (px, < 0 inside) to the union of the cells of particles ``idx``.

    ``idx`` holds uniform-cell particles first, each part sorted by decreasing cell count, so the
    particles that have a cell k form a prefix (array views, no copies).
    """
    n, side = len(idx), gx.shape[-1]
    sd = np.empty((n, side, side), dtype=_F)
    nu = int(np.count_nonzero(uniform_cells(lat)[idx]))
    if nu:
        _field_uniform(lat, idx[:nu], scale[:nu], gx[:nu], gy[:nu], world, sd[:nu])
    if nu < n:
        _field_general(lat, idx[nu:], scale[nu:], gx[nu:], gy[nu:], world, sd[nu:])
    return sd


def uniform_cells(lat: Latents) -> np.ndarray:
    """True where all of a particle's cells have the same size and rotation."""
    valid = np.arange(lat.ca.shape[1])[None, :] < lat.n_cells[:, None]
    same = (lat.ca == lat.ca[:, :1]) & (lat.cb == lat.cb[:, :1]) & (lat.crot == lat.crot[:, :1])
    return np.all(same | ~valid, axis=1)


def _spines(
    lat: Latents,
    idx: np.ndarray,
    scale: np.ndarray,
    gx: np.ndarray,
    gy: np.ndarray,
    blur: np.ndarray,
    world,
    dark: np.ndarray,
):
    """Darken thin spines leaving cell 0 of spined particles (in place); blur widens and fades them."""
    x, y = world
    nsp = lat.spines[idx]
    for m in range(int(nsp.max(initial=0))):
        sub = np.nonzero(nsp > m)[0]
        j, inv = idx[sub], 1.0 / scale[sub]
        psi = 2.0 * np.pi * (m + 0.25) / nsp[sub]  # spine direction in the cell's own frame
        a, b = lat.ca[j, 0], lat.cb[j, 0]
        rho = a * b / np.sqrt((b * np.cos(psi)) ** 2 + (a * np.sin(psi)) ** 2)
        ang = lat.theta[j] + lat.crot[j, 0] + psi
        ux, uy = np.cos(ang), np.sin(ang)
        px = gx[sub] - _col((x[j, 0] + rho * ux) * inv)
        py = gy[sub] - _col((y[j, 0] + rho * uy) * inv)
        ux, uy = _col(ux), _col(uy)
        t = np.clip(px * ux + py * uy, 0.0, _col(lat.spine_len[j] * inv))
        d2 = (px - t * ux) ** 2 + (py - t * uy) ** 2
        width2 = _col(0.6 + blur[sub] ** 2)
        dark[sub] = np.maximum(dark[sub], (0.45 / width2) * np.clip(1.0 - d2 / width2, 0.0, 1.0))


def _debris(style: DomainStyle, gx: np.ndarray, gy: np.ndarray, dark: np.ndarray, rng: np.random.Generator):
    """Add up to 4 small dark specks per crop (suspended debris in field samples), in place."""
    n, side = dark.shape[0], dark.shape[-1]
    count = np.minimum(rng.poisson(style.debris, size=n), 4)
    for m in range(int(count.max(initial=0))):
        sub = np.nonzero(count > m)[0]
        pos = rng.uniform(-side / 2, side / 2, size=(len(sub), 2, 1, 1)).astype(_F)
        inv = (1.0 / rng.uniform(0.8, 1.8, size=(len(sub), 1, 1))).astype(_F)
        amp = rng.uniform(0.2, 0.5, size=(len(sub), 1, 1)).astype(_F)
        ex = np.clip(1.0 - np.abs(gx[sub] - pos[:, 0]) * inv, 0.0, 1.0)
        ey = np.clip(1.0 - np.abs(gy[sub] - pos[:, 1]) * inv, 0.0, 1.0)
        dark[sub] += amp * ex * ey


def _render_batch(
    lat: Latents,
    idx: np.ndarray,
    scale: np.ndarray,
    side: int,
    world,
    style: DomainStyle,
    rng: np.random.Generator,
) -> np.ndarray:
    """uint8 crops (n, side, side) of the particles ``idx`` (ordered as ``_cells_field`` needs)."""
    n = len(idx)
    grid = np.arange(side, dtype=_F) - _F((side - 1) / 2.0)
    off = rng.uniform(-1.0, 1.0, size=(n, 2))
    gx, gy = grid[None, None, :] - _col(off[:, 0]), grid[None, :, None] - _col(off[:, 1])
    sd = _cells_field(lat, idx, scale, gx, gy, world)
    blur = rng.uniform(*style.blur_px, size=n)
    lut = edge_lut(lat.opacity[idx], blur)
    # nearest tabulated distance, offset into this crop's row of the flattened table
    pos = np.clip(sd * _F(1 / _LUT_STEP) + _F(0.5 - LUT_SD[0] / _LUT_STEP), 0, len(LUT_SD) - 1)
    pos = pos.astype(np.int32) + (np.arange(n, dtype=np.int32) * len(LUT_SD))[:, None, None]
    dark = np.take(lut, pos)
    hollow = np.nonzero(lat.hollow[idx] > 0)[0]
    if len(hollow):  # lighter interior: depth below the boundary relative to the half-width
        depth = np.clip(sd[hollow] * _col(-2.0 * scale[hollow] / lat.cb[idx[hollow], 0]), 0.0, 1.0)
        dark[hollow] *= 1.0 - _col(0.75 * lat.hollow[idx[hollow]]) * depth
    dark *= 1.0 + _col(0.5 * lat.texture[idx]) * _texture(n, side, rng)
    _spines(lat, idx, scale, gx, gy, blur, world, dark)
    _debris(style, gx, gy, dark, rng)
    level = rng.normal(style.bg_level[0], style.bg_level[1], size=n)
    ang = rng.uniform(0, 2 * np.pi, size=n)
    grad = rng.uniform(0, style.bg_gradient, size=n) / side
    bg = _col(level) + _col(grad * np.cos(ang)) * gx + _col(grad * np.sin(ang)) * gy
    img = bg * (1.0 - np.minimum(dark, 0.95))
    noise = np.frombuffer(rng.bytes(img.size), dtype=np.int8).reshape(img.shape)
    img += noise * _F(style.img_noise / 73.9)  # uniform bytes, scaled to the noise sd
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def render_images(
    lat: Latents, image_size: int, style: DomainStyle, rng: np.random.Generator
) -> list[np.ndarray]:
    """One uint8 (side, side) crop per particle; particles are rendered in batches of equal crop side."""
    side, scale = crop_geometry(lat, image_size)
    world = _world(lat)
    out: list[np.ndarray] = [np.empty(0, np.uint8)] * len(lat)
    order = np.lexsort((-lat.n_cells, ~uniform_cells(lat), side))  # see _cells_field
    for s in np.unique(side):
        group = order[side[order] == s]
        for lo in range(0, len(group), BATCH):
            idx = group[lo : lo + BATCH]
            for i, im in zip(idx, _render_batch(lat, idx, scale[idx], int(s), world, style, rng)):
                out[i] = im
    return out


HEADER_PX = 25  # the SYKE exports' scale-bar band (GUIDE.md)
MIN_HEADER_PX = 16  # room for the label above the bar
SCALE_BAR_UM = 10.0
_GLYPHS = {  # 3x5 bitmaps of the label "10 um"
    "1": ("010", "110", "010", "010", "111"),
    "0": ("111", "101", "101", "101", "111"),
    "u": ("000", "101", "101", "101", "111"),
    "m": ("000", "110", "111", "101", "101"),
}


@functools.lru_cache(maxsize=64)
def scale_bar_header(width: int, height: int, um_px: float) -> np.ndarray:
    """The band burnt into the top of every SYKE crop: white, a label and a ``SCALE_BAR_UM`` bar at
    the source's nominal pixel pitch ``um_px``, at fixed places from the left edge (cut off where a
    crop is narrower). The same pixels in every crop of a source, like the instrument software's.
    Read-only: cached per width."""
    if height < MIN_HEADER_PX:
        raise ValueError(f"scale-bar header must be >= {MIN_HEADER_PX} px high (got {height})")
    band = np.full((height, width), 255, np.uint8)
    x = 3
    for ch in "10um":
        glyph = np.array([[c == "1" for c in row] for row in _GLYPHS[ch]])
        tile = band[3:8, x : x + 3]
        tile[glyph[:, : tile.shape[1]]] = 0
        x += 4
    bar = int(round(SCALE_BAR_UM / um_px))
    y = height // 2 + 3
    band[y : y + 3, 3 : 3 + bar] = 0
    band[y - 2 : y + 5, [c for c in (3, 2 + bar) if c < width]] = 0  # end ticks
    band.flags.writeable = False
    return band
