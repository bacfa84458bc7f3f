"""Per-particle latent variables, shared by the image renderer and the profile renderer.

A particle is a set of up to ``MAX_CELLS`` elliptical cells in its own frame (u along the particle's
long axis, v across it, µm), rotated by ``theta`` against the flow axis. The flow axis is the image's
x axis, so flipping an image horizontally and reversing its profile describe the same particle — the
paired augmentation of the method.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xmodal.data.synth_species import DomainStyle, Species

MAX_CELLS = 16
# Smallest first piece of a detritus particle, µm: 2 px at the coarsest pixel pitch the generator
# uses (synth_image.um_per_px(MIN_IMAGE_SIZE) = 2 µm; not imported: synth_image imports this module).
# The other pieces keep their free sizes (crumbs of a bigger aggregate).
DETRITUS_MIN_UM = 4.0


@dataclass
class Latents:
    species: np.ndarray  # (N,) int index into the catalogue
    n_cells: np.ndarray  # (N,) int, 1..MAX_CELLS
    cu: np.ndarray  # (N, K) cell centre along the particle axis, µm
    cv: np.ndarray  # (N, K) cell centre across the particle axis, µm
    ca: np.ndarray  # (N, K) semi-axis along the cell's own axis, µm
    cb: np.ndarray  # (N, K) semi-axis across it, µm
    crot: np.ndarray  # (N, K) cell axis angle relative to the particle axis, rad
    theta: np.ndarray  # (N,) particle axis angle relative to the flow (image x) axis, rad
    opacity: np.ndarray  # (N,) bright-field darkness of the cell bodies, 0..1
    texture: np.ndarray  # (N,) internal granularity, 0..1
    hollow: np.ndarray  # (N,) bright cell interior, 0..1
    spines: np.ndarray  # (N,) int number of spines on cell 0
    spine_len: np.ndarray  # (N,) µm
    refr: np.ndarray  # (N,) scatter efficiency
    chl: np.ndarray  # (N,) mV/µm², FL Red
    pe: np.ndarray  # (N,) mV/µm², FL Orange
    yel: np.ndarray  # (N,) mV/µm², FL Yellow
    beam: np.ndarray  # (N,) intensity factor from the lateral position in the flow, 0.65..1
    curv_gain: np.ndarray  # (N,) signed gain of the Curvature signal
    sws_gain: np.ndarray  # (N,) particle-to-particle side-scatter variation (surface, vacuoles)

    def __len__(self) -> int:
        return len(self.species)


def _layout(sp: Species, n: int, a: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Cell centres (u, v) and rotations for ``n`` particles of one species with ``n_cells`` cells."""
    lo, hi = sp.cells
    n_cells = rng.integers(lo, hi + 1, size=n)
    k = np.arange(MAX_CELLS)[None, :]
    u = np.zeros((n, MAX_CELLS))
    v = np.zeros((n, MAX_CELLS))
    rot = np.zeros((n, MAX_CELLS))
    if sp.morph in ("chain", "filament"):
        # touching cells (chains) or overlapping segments (filaments: a continuous trichome)
        step = 2.0 * a * (1.03 if sp.morph == "chain" else 0.9)
        u = (k - (n_cells[:, None] - 1) / 2.0) * step
        bend = rng.normal(0.0, 0.004, size=(n, 1)) if sp.morph == "filament" else 0.0
        v = bend * u**2  # a gently curved trichome; its cells keep the particle's orientation
    elif sp.morph == "ring":
        radius = n_cells[:, None] * a * 2.1 / (2.0 * np.pi)
        phi = 2.0 * np.pi * k / n_cells[:, None] + rng.uniform(0, 2 * np.pi, size=(n, 1))
        u, v = radius * np.cos(phi), radius * np.sin(phi)
    elif sp.morph in ("colony", "detritus"):
        # the profile twin of a ring: the same cells at nearly the same distances from the centre (so
        # every projection on the flow axis spreads alike) but at irregular angles: a lumpy clump
        radius = n_cells[:, None] * a * 2.1 / (2.0 * np.pi)
        lo = 0.0 if sp.morph == "detritus" else 0.8
        r = radius * np.sqrt(rng.uniform(lo, 1.0, size=(n, MAX_CELLS)))
        phi = rng.uniform(0, 2 * np.pi, size=(n, MAX_CELLS))
        u, v = r * np.cos(phi), r * np.sin(phi)
        if sp.morph == "detritus":  # irregular pieces; colony cells are round and need no rotation
            rot = rng.uniform(0, np.pi, size=(n, MAX_CELLS))
    return n_cells, u, v, rot


def sample_species(sp: Species, index: int, n: int, style: DomainStyle, rng: np.random.Generator) -> Latents:
    """Latents of ``n`` particles of species ``sp`` under the acquisition conditions of ``style``."""
    size = sp.size * style.size_scale * np.exp(rng.normal(0.0, sp.size_sd * style.size_spread, size=(n, 1)))
    if sp.morph == "detritus":  # irregular aggregates: every piece has its own size
        size = size * np.exp(rng.normal(0.0, 0.35, size=(n, MAX_CELLS)))
        # a product of log-normals has no lower bound: a particle of only sub-pixel pieces renders
        # as an empty crop that ingest quarantines, so its first piece (always drawn) gets a floor
        size[:, 0] = np.maximum(size[:, 0], DETRITUS_MIN_UM)
    aspect = sp.aspect * np.exp(rng.normal(0.0, 0.08, size=(n, 1)))
    a = np.broadcast_to(size / 2.0, (n, MAX_CELLS)).copy()
    b = a / aspect
    n_cells, u, v, rot = _layout(sp, n, a, rng)
    isotropic = sp.morph in ("colony", "ring", "detritus")
    theta = rng.uniform(0, np.pi, size=n) if isotropic else rng.normal(0.0, style.theta_sd, size=n)
    # a shared pigment load (light history, growth phase) times small per-pigment deviations: absolute
    # fluorescence spans a wide range while the pigment ratios that tell species apart stay tight
    pig = style.pigment_scale * np.exp(rng.normal(0.0, 0.9, size=(n, 1)) + rng.normal(0.0, 0.2, size=(n, 3)))
    lateral = rng.uniform(-1.0, 1.0, size=n)
    return Latents(
        species=np.full(n, index, dtype=np.int64),
        n_cells=n_cells.astype(np.int64),
        cu=u,
        cv=v,
        ca=a,
        cb=b,
        crot=rot,
        theta=theta,
        opacity=np.clip(sp.opacity + rng.normal(0, 0.06, size=n), 0.15, 0.95),
        texture=np.clip(sp.texture + rng.normal(0, 0.05, size=n), 0.0, 1.0),
        hollow=np.full(n, sp.hollow),
        spines=np.full(n, sp.spines, dtype=np.int64),
        spine_len=sp.spine_len * size[:, 0] * np.exp(rng.normal(0.0, 0.1, size=n)),
        refr=sp.refr * np.exp(rng.normal(0.0, 0.1, size=n)),
        chl=sp.chl * pig[:, 0],
        pe=sp.pe * pig[:, 1],
        yel=sp.yel * pig[:, 2],
        beam=np.exp(-0.43 * lateral**2),
        curv_gain=rng.normal(0.3, 0.25, size=n),
        sws_gain=np.exp(rng.normal(0.0, 0.6, size=n)),
    )


def concat(parts: list[Latents]) -> Latents:
    fields = Latents.__dataclass_fields__
    return Latents(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in fields})


def sample_latents(
    species: list[Species], weights: np.ndarray, n: int, style: DomainStyle, rng: np.random.Generator
) -> Latents:
    """``n`` particles with classes drawn from ``weights``, in a random (seeded) order."""
    counts = rng.multinomial(n, weights)
    parts = [sample_species(sp, i, int(c), style, rng) for i, (sp, c) in enumerate(zip(species, counts)) if c]
    lat = concat(parts)
    order = rng.permutation(len(lat))
    return Latents(**{f: getattr(lat, f)[order] for f in Latents.__dataclass_fields__})


def flow_projection(lat: Latents) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per cell: centre along the flow axis x, half-extent along x, and cross-section half-width (µm).

    The cross-section keeps the cell's area (a·b = h·w), which is what forward scatter sees.
    """
    c, s = np.cos(lat.theta)[:, None], np.sin(lat.theta)[:, None]
    x = lat.cu * c - lat.cv * s
    phi = lat.theta[:, None] + lat.crot
    h = np.sqrt((lat.ca * np.cos(phi)) ** 2 + (lat.cb * np.sin(phi)) ** 2)
    w = lat.ca * lat.cb / h
    return x, h, w
