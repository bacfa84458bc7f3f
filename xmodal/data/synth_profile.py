"""CytoSense pulse shapes rendered from the same latents as the image, vectorised over particles.

A particle crosses a Gaussian laser sheet (``BEAM_FWHM_UM``) along the flow axis; a sample is taken
every ``UM_PER_SAMPLE`` µm of travel. Each cell contributes a bump whose width is its projected
length along the flow convolved with the beam and whose height follows its cross-section:

* FWS (forward scatter) ~ refractive contrast × cross-section²; it is the sum of a left and a right
  detector half, each saturating at ``FWS_HALF_SATURATION_MV`` (the real Cefas file tops out at
  14720 = 2 × 7360 mV), so FWS may exceed the 7488 mV detector saturation;
* SWS (side scatter) from internal structure: granularity inside cells plus a peak at every cell
  boundary, so chains show one peak per boundary;
* FL Red / FL Orange / FL Yellow from chlorophyll / phycoerythrin / other pigments, concentrated in
  the cell centres (chloroplasts), saturating at 7488 mV;
* Curvature: the signed left/right imbalance of FWS, which follows the slope of the FWS pulse; as in
  the real export it has zero mean over each particle.

The recorded window runs from where the pulse rises above the trigger level to where it falls below it
again, so bright particles get longer tails. Values are rounded to 4 significant digits (as CytoClus
writes them) and scatter/fluorescence below the 1/32 mV detector step read 0.
"""

from __future__ import annotations

import numpy as np

from xmodal.data.schema import N_CHANNELS, SATURATION_MV, UM_PER_SAMPLE
from xmodal.data.synth_latents import Latents, flow_projection
from xmodal.data.synth_species import DomainStyle

BEAM_FWHM_UM = 5.0
SIGMA_BEAM = BEAM_FWHM_UM / 2.3548
FWS_HALF_SATURATION_MV = 7360.0
TRIGGER_MV = 10.0
DETECTOR_STEP_MV = 1.0 / 32.0
MIN_LENGTH = 12  # the shortest pulse in the real Cefas export
# Detector gains (mV per µm² of cross-section), calibrated so that per-particle channel maxima of a
# field sample fall in the ranges of the real Cefas export (see tests/data/test_synth_stats.py).
C_FWS = 90.0
C_SWS = 90.0
C_EDGE = 45.0
SWS_KNEE_MV = 0.93 * SATURATION_MV
FL_GAIN = (1.0, 1.0, 2.5)  # FL Yellow, FL Orange, FL Red per unit pigment
_CHUNK = 256
_F = np.float32


_POW10 = 10.0 ** np.arange(-40, 41)  # 10**e for e in -40..40, looked up instead of computed


def round_sig(v: np.ndarray, digits: int = 4) -> np.ndarray:
    """Round to ``digits`` significant digits (zeros stay zero), in float64."""
    a = np.abs(v).astype(np.float32)
    mag = np.floor(np.log10(np.where(a > 0, a, 1.0), dtype=np.float32)).astype(np.int64)
    scale = _POW10[np.clip(digits - 1 - mag, -40, 40) + 40]
    return np.round(v * scale) / scale


def window(lat: Latents, x: np.ndarray, h: np.ndarray, w: np.ndarray, rng: np.random.Generator):
    """Start position (µm) and length (samples) of each particle's recorded pulse.

    Recording runs while FWS is above ``TRIGGER_MV``: each cell's Gaussian bump (peak F, width s)
    crosses it at s·sqrt(2 ln(F / T)) from its centre; the window spans the outermost crossings.
    """
    valid = np.arange(x.shape[1])[None, :] < lat.n_cells[:, None]
    sig = np.sqrt(h * h / 4.0 + SIGMA_BEAM**2)
    peak = C_FWS * (lat.refr * lat.beam)[:, None] * (2.0 * w) ** 2
    reach = sig * np.sqrt(2.0 * np.log(np.maximum(peak / TRIGGER_MV, 1.5)))
    lo = np.where(valid, x - reach, np.inf).min(axis=1)
    hi = np.where(valid, x + reach, -np.inf).max(axis=1)
    start = lo + rng.uniform(-UM_PER_SAMPLE, 0.0, size=len(lat))
    length = np.ceil((hi - start) / UM_PER_SAMPLE).astype(np.int64)
    return start, np.maximum(length, MIN_LENGTH)


def _clean(lat: Latents, idx: np.ndarray, t: np.ndarray, x, h, w) -> tuple[np.ndarray, ...]:
    """Noise-free body, chloroplast and edge accumulators at sample positions ``t`` (n, Lmax).

    ``idx`` is sorted by decreasing cell count, so cell k's batch is a prefix (a view, no copy).
    """
    body, plast, edge = np.zeros_like(t), np.zeros_like(t), np.zeros_like(t)
    ncell = lat.n_cells[idx]
    ib = _F(-0.5 / SIGMA_BEAM**2)
    for k in range(int(ncell[0])):
        m = int(np.count_nonzero(ncell > k))
        j = idx[:m]
        hk = h[j, k, None]
        area = ((2.0 * w[j, k, None]) ** 2).astype(_F)
        d = t[:m] - x[j, k, None].astype(_F)
        d2 = d * d
        body[:m] += area * np.exp(d2 * (-0.5 / (hk * hk / 4.0 + SIGMA_BEAM**2)).astype(_F))
        plast[:m] += area * np.exp(d2 * (-0.5 / (hk * hk / 9.0 + SIGMA_BEAM**2)).astype(_F))
        hk = hk.astype(_F)
        e1, e2 = d - hk, d + hk  # a peak at each cell boundary
        edge[:m] += area * (np.exp(e1 * e1 * ib) + np.exp(e2 * e2 * ib))
    return body, plast, edge


def _noisy(v: np.ndarray, add_mv: float, shot: float, scale: float, rng: np.random.Generator) -> np.ndarray:
    sd = scale * np.sqrt(add_mv**2 + shot**2 * np.maximum(v, 0.0))
    return v + sd * rng.standard_normal(v.shape)


def _render_chunk(
    lat: Latents,
    idx: np.ndarray,
    start: np.ndarray,
    length: np.ndarray,
    geo,
    style: DomainStyle,
    rng: np.random.Generator,
) -> np.ndarray:
    """(n, 6, Lmax) profiles of one chunk; samples past a particle's length are garbage."""
    x, h, w = geo
    n, lmax = len(idx), int(length[idx].max())
    t = (start[idx, None] + UM_PER_SAMPLE * np.arange(lmax)[None, :]).astype(_F)
    body, plast, edge = _clean(lat, idx, t, x, h, w)
    beam = lat.beam[idx, None]
    gain = np.exp(rng.normal(0.0, 0.05, size=(n, 5)))
    tex = lat.texture[idx, None]
    fws = C_FWS * lat.refr[idx, None] * beam * body * gain[:, 0:1]
    sws = C_SWS * (0.25 + tex) * lat.refr[idx, None] * body + C_EDGE * edge
    sws *= beam * lat.sws_gain[idx, None] * gain[:, 1:2]
    fl = [
        FL_GAIN[i] * pig[idx, None] * beam * plast * gain[:, 2 + i : 3 + i]
        for i, pig in enumerate((lat.yel, lat.pe, lat.chl))
    ]
    # Curvature: the left/right FWS imbalance follows the pulse slope; zero mean per particle
    slope = np.gradient(np.log(fws + 30.0), UM_PER_SAMPLE, axis=1) * SIGMA_BEAM
    curv = np.tanh(lat.curv_gain[idx, None] * slope)
    valid = np.arange(lmax)[None, :] < length[idx, None]
    curv -= (curv * valid).sum(axis=1, keepdims=True) / length[idx, None]
    curv = curv + 0.01 * style.prof_noise * rng.standard_normal(curv.shape)
    base = rng.uniform(0.0, style.baseline_mv, size=(n, 3, 1))
    fws = _noisy(fws, 1.0, 0.5, style.prof_noise, rng)
    half = np.clip(
        fws[:, None, :] * np.stack([1.0 + curv, 1.0 - curv], axis=1) / 2.0, 0, FWS_HALF_SATURATION_MV
    )
    out = np.empty((n, N_CHANNELS, lmax))
    out[:, 0] = half.sum(axis=1)
    # the side-scatter response bends over below the clip (the real export almost never saturates SWS)
    sws = SWS_KNEE_MV * np.tanh(sws / SWS_KNEE_MV)
    out[:, 1] = np.clip(_noisy(sws, 1.0, 0.5, style.prof_noise, rng), 0.0, SATURATION_MV)
    for i, f in enumerate(fl):
        out[:, 2 + i] = np.clip(_noisy(f + base[:, i], 0.15, 0.25, style.prof_noise, rng), 0.0, SATURATION_MV)
    out[:, :5] = np.where(out[:, :5] < DETECTOR_STEP_MV, 0.0, out[:, :5])
    out[:, 5] = np.clip(curv, -1.0, 1.3)
    return round_sig(out)


def render_profiles(lat: Latents, style: DomainStyle, rng: np.random.Generator) -> list[np.ndarray]:
    """One float32 (6, L) pulse-shape matrix per particle (canonical channel order, mV)."""
    geo = flow_projection(lat)
    start, length = window(lat, *geo, rng)
    order = np.argsort(length, kind="stable")  # chunks of similar length waste little padding
    out: list[np.ndarray] = [np.empty((N_CHANNELS, 0), np.float32)] * len(lat)
    for c in range(0, len(lat), _CHUNK):
        idx = order[c : c + _CHUNK]
        idx = idx[np.argsort(-lat.n_cells[idx], kind="stable")]
        prof = _render_chunk(lat, idx, start, length, geo, style, rng).astype(np.float32)
        for i, p in zip(idx, prof):
            out[i] = np.ascontiguousarray(p[:, : length[i]])
    return out
