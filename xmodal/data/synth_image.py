"""Bright-field crops rendered from the particle latents, vectorised over particles.

Real CytoSense crops (Cefas export) are dark, partly transparent particles on a light-gray background
(~186 of 255) with a thin bright halo at the edges; crops are square and grow with the particle. The
renderer follows that: a soft signed-distance field of the union of elliptical cells gives body
darkness, a dark rim and a bright halo; hollow cells are lighter inside; texture modulates the body;
thin spines are dark line segments; then illumination gradient, debris specks, Gaussian blur and
pixel noise. The image x axis is the flow axis.
"""

from __future__ import annotations

import numpy as np

from xmodal.data.synth_latents import Latents
from xmodal.data.synth_species import DomainStyle

MIN_SIDE_FRACTION = 4  # the smallest crop is image_size // 4 px
MARGIN_PX = 5.0  # background kept around the particle's bounding box
_TEX_CELL = 4  # texture grain in px (before blur)


def um_per_px(image_size: int) -> float:
    """Pixel pitch: a 64-px crop spans 32 µm; larger particles are shown shrunk into the largest crop."""
    return 32.0 / image_size


def crop_geometry(lat: Latents, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per particle: square crop side (px, multiple of 8) and effective µm per px."""
    c, s = np.cos(lat.theta)[:, None], np.sin(lat.theta)[:, None]
    x = lat.cu * c - lat.cv * s
    y = lat.cu * s + lat.cv * c
    valid = np.arange(lat.cu.shape[1])[None, :] < lat.n_cells[:, None]
    half = np.where(valid, np.maximum(np.abs(x), np.abs(y)) + lat.ca, 0.0).max(axis=1)
    half = np.maximum(half, np.where(lat.spines > 0, lat.ca[:, 0] + lat.spine_len, 0.0))
    base = um_per_px(image_size)
    need = 2.0 * half / base + 2.0 * MARGIN_PX
    side = np.clip(np.ceil(need / 8.0) * 8.0, max(8, image_size // MIN_SIDE_FRACTION), image_size)
    scale = base * np.maximum(1.0, need / image_size)
    return side.astype(np.int64), scale


def _blur(img: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Separable 5-tap Gaussian blur with a per-image sigma (px), edges replicated."""
    taps = np.arange(-2, 3, dtype=np.float32)
    w = np.exp(-(taps[None, :] ** 2) / (2.0 * sigma[:, None] ** 2)).astype(np.float32)
    w /= w.sum(axis=1, keepdims=True)
    s = img.shape[-1]
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (2, 2)
        p = np.pad(img, pad, mode="edge")
        out = np.zeros_like(img)
        for j in range(5):
            sl = [slice(None)] * 3
            sl[axis] = slice(j, j + s)
            out += w[:, j, None, None] * p[tuple(sl)]
        img = out
    return img


def _cells_field(lat: Latents, idx: np.ndarray, scale: np.ndarray, side: int, off: np.ndarray):
    """Signed distance (px, < 0 inside) to the union of cells and the normalised radius inside it."""
    n = len(idx)
    grid = np.arange(side, dtype=np.float32) - (side - 1) / 2.0
    gx, gy = grid[None, None, :] - off[:, 0, None, None], grid[None, :, None] - off[:, 1, None, None]
    sd = np.full((n, side, side), np.inf, dtype=np.float32)
    rmin = np.full((n, side, side), np.inf, dtype=np.float32)
    th = lat.theta[idx]
    c, s = np.cos(th), np.sin(th)
    for k in range(int(lat.n_cells[idx].max())):
        sub = np.nonzero(lat.n_cells[idx] > k)[0]
        j = idx[sub]
        inv = 1.0 / scale[sub]
        xk = (lat.cu[j, k] * c[sub] - lat.cv[j, k] * s[sub]) * inv
        yk = (lat.cu[j, k] * s[sub] + lat.cv[j, k] * c[sub]) * inv
        phi = th[sub] + lat.crot[j, k]
        cp, sp = np.cos(phi).astype(np.float32), np.sin(phi).astype(np.float32)
        a, b = (lat.ca[j, k] * inv).astype(np.float32), (lat.cb[j, k] * inv).astype(np.float32)
        dx = gx[sub] - xk.astype(np.float32)[:, None, None]
        dy = gy[sub] - yk.astype(np.float32)[:, None, None]
        along = (dx * cp[:, None, None] + dy * sp[:, None, None]) / a[:, None, None]
        across = (dy * cp[:, None, None] - dx * sp[:, None, None]) / b[:, None, None]
        r = np.sqrt(along * along + across * across)
        sd[sub] = np.minimum(sd[sub], (r - 1.0) * b[:, None, None])
        rmin[sub] = np.minimum(rmin[sub], r)
    return sd, rmin, gx, gy


def _spines(lat: Latents, idx: np.ndarray, scale: np.ndarray, gx: np.ndarray, gy: np.ndarray, side: int):
    """Darkness of thin spines leaving cell 0 of spined particles (zeros elsewhere)."""
    dark = np.zeros((len(idx), side, side), dtype=np.float32)
    nsp = lat.spines[idx]
    for m in range(int(nsp.max(initial=0))):
        sub = np.nonzero(nsp > m)[0]
        j = idx[sub]
        psi = 2.0 * np.pi * (m + 0.25) / nsp[sub]  # spine direction in the cell frame
        a, b = lat.ca[j, 0], lat.cb[j, 0]
        rho = a * b / np.sqrt((b * np.cos(psi)) ** 2 + (a * np.sin(psi)) ** 2)
        ang = lat.theta[j] + lat.crot[j, 0] + psi
        inv = 1.0 / scale[sub]
        x0 = (lat.cu[j, 0] * np.cos(lat.theta[j]) - lat.cv[j, 0] * np.sin(lat.theta[j])) * inv
        y0 = (lat.cu[j, 0] * np.sin(lat.theta[j]) + lat.cv[j, 0] * np.cos(lat.theta[j])) * inv
        ax, ay = x0 + rho * inv * np.cos(ang), y0 + rho * inv * np.sin(ang)
        dxu, dyu = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        length = (lat.spine_len[j] * inv).astype(np.float32)
        px = gx[sub] - ax.astype(np.float32)[:, None, None]
        py = gy[sub] - ay.astype(np.float32)[:, None, None]
        t = np.clip(px * dxu[:, None, None] + py * dyu[:, None, None], 0.0, length[:, None, None])
        d2 = (px - t * dxu[:, None, None]) ** 2 + (py - t * dyu[:, None, None]) ** 2
        dark[sub] = np.maximum(dark[sub], 0.55 * np.exp(-d2 / 0.6))
    return dark


def _render_group(
    lat: Latents, idx: np.ndarray, scale: np.ndarray, side: int, style: DomainStyle, rng: np.random.Generator
) -> np.ndarray:
    n = len(idx)
    off = rng.uniform(-1.0, 1.0, size=(n, 2)).astype(np.float32)
    sd, rmin, gx, gy = _cells_field(lat, idx, scale, side, off)
    col = lambda v: v.astype(np.float32)[:, None, None]  # noqa: E731
    g = side // _TEX_CELL + 1
    tex = rng.standard_normal((n, g, g), dtype=np.float32).repeat(_TEX_CELL, 1).repeat(_TEX_CELL, 2)
    tex = tex[:, :side, :side]
    body = 0.5 * (1.0 - np.tanh(sd / 1.2))  # soft inside indicator
    inner = np.clip(1.0 - rmin * rmin, 0.0, 1.0)
    dark = col(lat.opacity[idx]) * body * (1.0 - 0.75 * col(lat.hollow[idx]) * inner)
    dark *= 1.0 + 0.5 * col(lat.texture[idx]) * tex
    dark += 0.25 * np.exp(-sd * sd)  # dark cell wall
    dark = np.maximum(dark, _spines(lat, idx, scale, gx, gy, side))
    n_debris = np.minimum(rng.poisson(style.debris, size=n), 4)
    for m in range(int(n_debris.max(initial=0))):
        sub = np.nonzero(n_debris > m)[0]
        pos = rng.uniform(-side / 2, side / 2, size=(len(sub), 2)).astype(np.float32)
        sig2 = 2.0 * rng.uniform(0.6, 1.5, size=len(sub)).astype(np.float32) ** 2
        amp = rng.uniform(0.2, 0.5, size=len(sub)).astype(np.float32)
        ex = np.exp(-((gx[sub] - pos[:, 0, None, None]) ** 2) / sig2[:, None, None])
        ey = np.exp(-((gy[sub] - pos[:, 1, None, None]) ** 2) / sig2[:, None, None])
        dark[sub] += amp[:, None, None] * ex * ey
    halo = 0.22 * np.exp(-((sd - 2.0) ** 2) / 1.5)  # bright diffraction halo just outside the edge
    level = rng.normal(style.bg_level[0], style.bg_level[1], size=n)
    ang = rng.uniform(0, 2 * np.pi, size=n)
    grad = rng.uniform(0, style.bg_gradient, size=n) / side
    bg = col(level) + col(grad * np.cos(ang)) * gx + col(grad * np.sin(ang)) * gy
    img = bg * (1.0 - np.clip(dark, 0.0, 0.95) + halo)
    img = _blur(img, rng.uniform(*style.blur_px, size=n))
    img += style.img_noise * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_images(
    lat: Latents, image_size: int, style: DomainStyle, rng: np.random.Generator
) -> list[np.ndarray]:
    """One uint8 (side, side) crop per particle; particles are rendered in groups of equal crop side."""
    side, scale = crop_geometry(lat, image_size)
    out: list[np.ndarray] = [np.empty(0, np.uint8)] * len(lat)
    for s in np.unique(side):
        idx = np.nonzero(side == s)[0]
        imgs = _render_group(lat, idx, scale[idx], int(s), style, rng)
        for i, im in zip(idx, imgs):
            out[i] = im
    return out
