"""The synthetic world: species (latent morphology + pigments) and domains (acquisition conditions).

Species are designed in confusable pairs so that neither modality alone is enough:

* image twins look the same in bright field but carry different pigments (they differ only in
  FL Orange / FL Red), e.g. a green alga and a cryptophyte of the same size and shape;
* profile twins have the same size, cross-section, cell count and pigments along the flow axis but a
  different outline in the image: long thin spines, which barely scatter (a strict twin), or cells
  set in a regular ring rather than a lumpy clump at the same radii (a partial twin: the irregular
  spacing still shows up in the pulse as overlapping cells).

Within-species variability (size, orientation, cell count, pigment load) makes the remaining classes
overlap partly too, so image-only and profile-only k-NN are both clearly imperfect while fusing the
two modalities separates the twins. ``detritus`` is an extra class without fluorescence.

The catalogue depends only on ``n_species`` (never on the data seed), so data sets generated with
different seeds share the same species.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from xmodal.config import ConfigError

MORPHS = ("single", "chain", "filament", "colony", "ring", "detritus")
DETRITUS = "detritus"


@dataclass(frozen=True)
class Species:
    """Latent description of one taxon. Lengths are µm, pigments are mV per µm² of cross-section."""

    name: str
    morph: str  # one of MORPHS
    size: float  # median cell length (long axis) in µm
    size_sd: float  # log-normal sigma of the cell size
    aspect: float  # cell length / width
    cells: tuple[int, int]  # inclusive range of cells per particle (filament: segments)
    spines: int = 0  # long thin spines on the first cell (image only: they scatter little)
    spine_len: float = 0.0  # spine length relative to the cell length
    texture: float = 0.2  # internal granularity: image speckle and side scatter
    hollow: float = 0.0  # bright cell interior (e.g. diatom frustules)
    opacity: float = 0.6  # bright-field darkness of the cell body
    refr: float = 1.0  # scatter efficiency (refractive index contrast)
    chl: float = 0.0  # chlorophyll -> FL Red
    pe: float = 0.0  # phycoerythrin -> FL Orange
    yel: float = 0.0  # other pigments -> FL Yellow
    in_lab: bool = True  # False: only seen in the field domains (SEA, UTO)
    abundance: float = 1.0  # multiplies the domain's long-tail class weight


# Ordered so that twins stay together when a catalogue is truncated to its first n species.
# fmt: off
_DESIGNED: tuple[Species, ...] = (
    # image twins: a green coccoid and a cryptophyte-like cell (PE -> FL Orange)
    Species("chlorella", "single", 6.0, 0.15, 1.1, (1, 1), texture=0.1, opacity=0.55, chl=14.0, pe=0.05, yel=0.08),
    Species("cryptomonas", "single", 6.3, 0.15, 1.1, (1, 1), texture=0.1, opacity=0.55, chl=9.0, pe=7.0, yel=0.08),
    # profile twins: a pennate diatom and the same body with long spines
    Species("navicula", "single", 18.0, 0.15, 3.5, (1, 1), texture=0.3, hollow=0.6, opacity=0.5, refr=1.2,
            chl=6.0, pe=0.05, yel=0.2),
    Species("chaetoceros", "single", 18.0, 0.15, 3.5, (1, 1), spines=4, spine_len=0.9, texture=0.3, hollow=0.6,
            opacity=0.5, refr=1.2, chl=6.0, pe=0.05, yel=0.2),
    # image twins: a diatom chain and a cyanobacterial chain of the same cells
    Species("skeletonema", "chain", 5.0, 0.12, 1.2, (3, 8), texture=0.25, opacity=0.6, chl=12.0, pe=0.05, yel=0.15),
    Species("pseudanabaena", "chain", 5.0, 0.12, 1.2, (3, 8), texture=0.25, opacity=0.6, chl=4.0, pe=9.0, yel=0.1),
    # profile twins: a loose clump of small cells and the same cells arranged in a ring
    Species("microcystis", "colony", 3.5, 0.12, 1.0, (8, 16), texture=0.5, opacity=0.7, chl=7.0, pe=5.0, yel=0.1),
    Species("pediastrum", "ring", 3.5, 0.12, 1.0, (8, 16), texture=0.5, opacity=0.7, chl=7.0, pe=5.0, yel=0.1),
    # image twins: a PE-rich filament and a green filament
    Species("dolichospermum", "filament", 6.5, 0.2, 1.6, (8, 16), texture=0.2, opacity=0.55, chl=5.0, pe=8.0,
            yel=0.1),
    Species("ulothrix", "filament", 6.5, 0.2, 1.6, (8, 16), texture=0.2, opacity=0.55, chl=11.0, pe=0.05, yel=0.1),
    # field-only species (absent from the labelled cultures): a picocyanobacterium, abundant at sea and
    # too small for the camera to show more than a dot, and a large horned dinoflagellate
    Species("cyanobium", "single", 3.0, 0.2, 1.1, (1, 1), texture=0.0, opacity=0.4, refr=0.9, chl=1.5, pe=5.0,
            yel=0.05, in_lab=False, abundance=6.0),
    Species("ceratium", "single", 17.0, 0.15, 1.6, (1, 1), spines=3, spine_len=1.0, texture=0.6, opacity=0.75,
            refr=1.1, chl=8.0, pe=0.1, yel=0.3, in_lab=False),
)
# fmt: on

DETRITUS_SPECIES = Species(DETRITUS, "detritus", 3.5, 0.4, 1.4, (1, 6), texture=0.7, opacity=0.45, refr=0.8)


def catalogue(n_species: int = 12) -> list[Species]:
    """The first ``n_species`` designed species, then seeded variants, then ``detritus`` (last).

    Variants beyond the 12 designed species perturb a designed one's size, aspect and pigments with a
    fixed generator, so a catalogue is a function of ``n_species`` alone.
    """
    if n_species < 2:
        raise ConfigError(f"synth: n_species must be >= 2 (got {n_species}); the world needs pairs of taxa")
    species = list(_DESIGNED[:n_species])
    rng = np.random.default_rng(20260317)
    while len(species) < n_species:
        base = _DESIGNED[len(species) % len(_DESIGNED)]
        f = np.exp(rng.normal(0.0, 0.25, size=5))
        species.append(
            replace(
                base,
                name=f"{base.name}_v{len(species) // len(_DESIGNED)}",
                size=float(base.size * f[0]),
                aspect=float(max(1.0, base.aspect * f[1])),
                chl=float(base.chl * f[2]),
                pe=float(base.pe * f[3]),
                yel=float(base.yel * f[4]),
                texture=float(np.clip(base.texture + rng.normal(0, 0.15), 0.0, 1.0)),
            )
        )
    return species + [DETRITUS_SPECIES]


@dataclass(frozen=True)
class DomainStyle:
    """Acquisition conditions of one domain; SEA and UTO are shifted against the LAB cultures."""

    name: str
    labelled: bool
    zipf: float  # long-tail exponent of the class frequencies (rank^-zipf)
    detritus_frac: float  # fraction of particles that are detritus
    size_scale: float  # multiplies every cell size (field populations are smaller / larger)
    size_spread: float  # multiplies the species' log-size sigma
    bg_level: tuple[float, float]  # background gray level: mean, sd across particles
    bg_gradient: float  # max illumination gradient across a crop, gray levels
    blur_px: tuple[float, float]  # Gaussian blur sigma range (px)
    img_noise: float  # pixel noise sd, gray levels
    debris: float  # mean number of small debris specks per crop
    prof_noise: float  # multiplies the detector noise
    baseline_mv: float  # max detector baseline offset
    theta_sd: float  # orientation spread around the flow axis (rad)
    order_seed: int  # permutes which species are common and which are rare
    pigment_scale: float  # multiplies pigment loads (high-light field cells carry less than cultures)


# fmt: off
DOMAINS: dict[str, DomainStyle] = {
    #                        labelled zipf  detr  size  spread  background   grad  blur         noise debris prof base theta order pigm
    "LAB": DomainStyle("LAB", True,  0.8, 0.05, 1.0,  1.0, (186.0, 3.0),  4.0, (0.5, 0.9), 2.0, 0.0, 1.0, 0.5, 0.35, 1, 1.0),
    "SEA": DomainStyle("SEA", True,  1.1, 0.15, 0.85, 1.4, (172.0, 10.0), 14.0, (0.7, 1.6), 4.5, 1.5, 2.0, 1.5, 0.55, 2, 0.6),
    "UTO": DomainStyle("UTO", False, 1.0, 0.2,  1.1,  1.3, (178.0, 8.0),  10.0, (0.6, 1.4), 3.5, 1.0, 1.6, 1.2, 0.5, 3, 1.0),
}
# fmt: on


def class_weights(species: list[Species], style: DomainStyle) -> np.ndarray:
    """Long-tailed class frequencies for a domain (detritus last, with its fixed fraction)."""
    taxa = species[:-1]
    rank = np.random.default_rng(style.order_seed).permutation(len(taxa))
    w = (1.0 + rank) ** -style.zipf * np.array([s.abundance for s in taxa])
    if style.name == "LAB":
        w = w * np.array([s.in_lab for s in taxa], dtype=float)
    w = (1.0 - style.detritus_frac) * w / w.sum()
    return np.append(w, style.detritus_frac)
