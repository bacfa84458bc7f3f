"""`xmodal synth`: a faithful synthetic CytoSense data set (LAB, SEA, UTO) from a shared latent model.

Every particle is drawn from a species (``synth_species``) as latents (``synth_latents``); its image
(``synth_image``) and its pulse shapes (``synth_profile``) are both rendered from those latents, so
the two modalities agree about the same particle the way real ones do.

Output layouts:

* ``fmt="syke"``: ``out/<DOMAIN>/annotations.csv`` (``image,profile,class,particle_id``; ``class``
  empty = unlabelled), ``images/<id>.png`` (8-bit gray) and ``profiles/<id>.csv`` (header
  ``FWS,SWS,FL Yellow,FL Orange,FL Red,Curvature``, L rows, mV) — the layout the real reader ingests;
* ``fmt="parquet"``: ``out/<DOMAIN>/part-*.parquet`` rows of ``xmodal.data.schema`` (PNG bytes).

Both also write ``out/synth.json`` (species, domains, counts). Generation runs in fixed chunks, each
with its own generator derived from ``(seed, domain, chunk)``, so the bytes written depend only on
the arguments.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from xmodal.data.schema import CHANNELS, ShardWriter, make_record
from xmodal.data.synth_image import render_images
from xmodal.data.synth_latents import Latents, sample_latents
from xmodal.data.synth_profile import render_profiles
from xmodal.data.synth_species import DETRITUS, DOMAINS, Species, catalogue, class_weights

FORMATS = ("syke", "parquet")
CHUNK = 512  # particles per generator chunk (also bounds memory)
PNG_LEVEL = 1  # zlib level: the noise in the crops makes higher levels slow for a few % of bytes
_DOMAIN_CODE = {"LAB": 1, "SEA": 2, "UTO": 3}


def encode_png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


def profile_csv(profile: np.ndarray) -> str:
    """A (6, L) profile as the CSV text of a SYKE profile file (values are already 4 significant digits)."""
    rows = (",".join(f"{v:g}" for v in row) for row in profile.T.tolist())
    return ",".join(CHANNELS) + "\n" + "\n".join(rows) + "\n"


def generate_chunks(
    domain: str, n: int, seed: int, image_size: int, species: list[Species]
) -> Iterator[tuple[Latents, list[np.ndarray], list[np.ndarray]]]:
    """Latents, images and profiles of ``n`` particles of ``domain``, ``CHUNK`` at a time."""
    style = DOMAINS[domain]
    weights = class_weights(species, style)
    for c, lo in enumerate(range(0, n, CHUNK)):
        rng = np.random.default_rng(np.random.SeedSequence([seed, _DOMAIN_CODE[domain], c]))
        lat = sample_latents(species, weights, min(CHUNK, n - lo), style, rng)
        yield lat, render_images(lat, image_size, style, rng), render_profiles(lat, style, rng)


def _write_parquet(out: Path, domain: str, chunks, species: list[Species], counts: Counter) -> None:
    labelled = DOMAINS[domain].labelled
    i = 0
    with ShardWriter(out / domain) as writer:
        for lat, images, profiles in chunks:
            for s, img, prof in zip(lat.species.tolist(), images, profiles):
                name = species[s].name
                counts[name] += 1
                writer.write(
                    make_record(
                        f"synth:{domain}_{i:07d}",
                        "synth",
                        domain,
                        name if labelled else None,
                        encode_png(img),
                        img.shape,
                        prof,
                    )
                )
                i += 1


def _write_syke(out: Path, domain: str, chunks, species: list[Species], counts: Counter) -> None:
    labelled = DOMAINS[domain].labelled
    root = out / domain
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "profiles").mkdir(parents=True, exist_ok=True)
    i = 0
    with open(root / "annotations.csv", "w", newline="") as f:
        ann = csv.writer(f, lineterminator="\n")
        ann.writerow(["image", "profile", "class", "particle_id"])
        for lat, images, profiles in chunks:
            for s, img, prof in zip(lat.species.tolist(), images, profiles):
                pid = f"{domain}_{i:07d}"
                name = species[s].name
                counts[name] += 1
                (root / "images" / f"{pid}.png").write_bytes(encode_png(img))
                (root / "profiles" / f"{pid}.csv").write_text(profile_csv(prof))
                ann.writerow([f"images/{pid}.png", f"profiles/{pid}.csv", name if labelled else "", pid])
                i += 1


def synthesize(
    out: str | Path,
    n_lab: int,
    n_sea: int,
    n_uto: int,
    seed: int = 0,
    fmt: str = "syke",
    image_size: int = 64,
    n_species: int = 12,
    progress: bool = False,
) -> dict[str, Any]:
    """Write a synthetic LAB/SEA/UTO data set under ``out``; returns the summary (also ``out/synth.json``).

    ``n_species`` biological taxa plus ``detritus``; taxa flagged field-only never occur in LAB.
    ``progress`` prints one line per domain with the rate, to stderr.
    """
    if fmt not in FORMATS:
        raise ValueError(f"synth: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if image_size < 16:
        raise ValueError(f"synth: image_size must be >= 16 px (got {image_size})")
    sizes = {"LAB": n_lab, "SEA": n_sea, "UTO": n_uto}
    for d, n in sizes.items():
        if n < 0:
            raise ValueError(f"synth: particle count for {d} must be >= 0 (got {n})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    species = catalogue(n_species)
    writer = _write_parquet if fmt == "parquet" else _write_syke
    domains: dict[str, Any] = {}
    for domain, n in sizes.items():
        if n == 0:
            continue
        t0 = time.perf_counter()
        counts: Counter = Counter()
        writer(out, domain, generate_chunks(domain, n, seed, image_size, species), species, counts)
        if progress:
            dt = time.perf_counter() - t0
            print(f"synth {domain}: {n} particles in {dt:.1f} s ({n / max(dt, 1e-9):.0f}/s)", file=sys.stderr)
        domains[domain] = {
            "particles": n,
            "labelled": DOMAINS[domain].labelled,
            "classes": {s.name: counts[s.name] for s in species if counts[s.name]},
        }
    summary = {
        "format": fmt,
        "seed": seed,
        "image_size": image_size,
        "species": [s.name for s in species],
        "detritus": DETRITUS,
        "absent_from_lab": [s.name for s in species if not s.in_lab],
        "domains": domains,
    }
    (out / "synth.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
