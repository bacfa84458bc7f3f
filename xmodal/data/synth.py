"""`xmodal synth`: a faithful synthetic CytoSense data set (LAB, SEA, UTO) from a shared latent model.

Every particle is drawn from a species (``synth_species``) as latents (``synth_latents``); its image
(``synth_image``) and its pulse shapes (``synth_profile``) are both rendered from those latents, so
the two modalities agree about the same particle the way real ones do.

Output layouts:

* ``fmt="syke"``: ``out/<DOMAIN>/annotations.csv`` (``image,profile,class,particle_id``; ``class``
  empty = unlabelled), ``images/<id>.png`` (8-bit gray, the scale-bar header of ``header_px`` rows on
  top, as in the SYKE dataset) and ``profiles/<id>.csv`` (header
  ``FWS,SWS,FL Yellow,FL Orange,FL Red,Curvature``, L rows, mV) — the layout the real reader ingests;
* ``fmt="parquet"``: ``out/<DOMAIN>/part-*.parquet`` rows of ``xmodal.data.schema`` (PNG bytes), the
  crops without a header, as ``xmodal ingest`` gives them once it has cut it.

Both also write ``out/synth.json`` (species, domains, counts): first a provisional one with
``"complete": false`` before any domain is written, so that the next run into ``out`` may replace the
folders of an interrupted or failed run, then the full summary with ``"complete": true``.

A particle's Parquet ``particle_id`` is ``<DOMAIN>:<DOMAIN>_<index>`` with ``source`` = the domain
folder: exactly what ``xmodal ingest`` gives the same particle read from the SYKE layout. Generation
runs in fixed chunks, each with its own generator derived from ``(seed, domain, chunk)``, so the
bytes written depend only on the arguments.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import shutil
import struct
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from xmodal.config import ConfigError
from xmodal.data.readers.header import MAX_ROWS as MAX_HEADER_ROWS
from xmodal.data.schema import CHANNELS, N_CHANNELS, SCHEMA, ShardWriter
from xmodal.data.synth_image import (
    HEADER_PX,
    MIN_HEADER_PX,
    MIN_IMAGE_SIZE,
    render_images,
    scale_bar_header,
    um_per_px,
)
from xmodal.data.synth_latents import Latents, sample_latents
from xmodal.data.synth_profile import render_profiles
from xmodal.data.synth_species import DETRITUS, DOMAINS, Species, catalogue, class_weights

FORMATS = ("syke", "parquet")
CHUNK = 512  # particles per generator chunk (also bounds memory)
PNG_LEVEL = 1  # zlib level: the noise in the crops makes higher levels slow for a few % of bytes
_DOMAIN_CODE = {"LAB": 1, "SEA": 2, "UTO": 3}


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


_PNG_END = _png_chunk(b"IEND", b"")


@functools.lru_cache(maxsize=256)
def _png_head(h: int, w: int) -> bytes:
    """Signature + IHDR for an 8-bit grayscale, non-interlaced h x w image (few distinct crop sizes)."""
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))


def encode_png(img: np.ndarray) -> bytes:
    """8-bit grayscale PNG (filter 0 on every row, zlib level ``PNG_LEVEL``).

    Written by hand because Pillow's encoder spent ~310 µs per 64-px crop against ~85 µs here, and
    PNG encoding is the largest single cost of generation. Any PNG decoder reads it back exactly.
    """
    h, w = img.shape
    raw = np.zeros((h, w + 1), dtype=np.uint8)  # a leading 0 per row = filter type "None"
    raw[:, 1:] = img
    return _png_head(h, w) + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), PNG_LEVEL)) + _PNG_END


def profile_csv(profile: np.ndarray) -> str:
    """A (6, L) profile as the CSV text of a SYKE profile file (values are already 4 significant digits)."""
    row = ",".join(["%g"] * len(CHANNELS)) + "\n"
    return ",".join(CHANNELS) + "\n" + (row * profile.shape[1]) % tuple(profile.T.ravel().tolist())


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


def file_stem(domain: str, i: int) -> str:
    """Name of particle ``i`` in the SYKE layout (image, profile and ``particle_id`` column)."""
    return f"{domain}_{i:07d}"


def particle_id(domain: str, i: int) -> str:
    """The Parquet ``particle_id``: ``<source>:<id>`` with the domain folder as source — the same id
    ``xmodal ingest`` gives the particle when it reads the SYKE layout, so both paths agree."""
    return f"{domain}:{file_stem(domain, i)}"


def particle_table(
    domain: str,
    first: int,
    lat: Latents,
    images: list[np.ndarray],
    profiles: list[np.ndarray],
    species: list[Species],
) -> pa.Table:
    """Rows of the Parquet schema for one chunk, built column-wise.

    Equal to ``records_to_table([make_record(...) ...])`` (a test checks it) but without a Python dict
    and a list conversion per particle, which cost more than rendering the particle.
    """
    n = len(lat)
    labelled = DOMAINS[domain].labelled
    lengths = np.array([p.shape[1] for p in profiles], dtype=np.int32)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths * N_CHANNELS, out=offsets[1:])
    flat = np.concatenate([p.reshape(-1) for p in profiles]).astype(np.float32)
    mask_offsets = np.arange(0, N_CHANNELS * (n + 1), N_CHANNELS, dtype=np.int32)
    names = [species[s].name for s in lat.species.tolist()]
    cols = {
        "particle_id": [particle_id(domain, i) for i in range(first, first + n)],
        "source": [domain] * n,
        "domain": [domain] * n,
        "label": names if labelled else [None] * n,
        "has_image": np.ones(n, dtype=bool),
        "image": pa.array([encode_png(im) for im in images], pa.binary()),
        "image_height": np.array([im.shape[0] for im in images], dtype=np.int32),
        "image_width": np.array([im.shape[1] for im in images], dtype=np.int32),
        "has_profile": np.ones(n, dtype=bool),
        "profile": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
        "profile_length": lengths,
        "channel_mask": pa.ListArray.from_arrays(
            pa.array(mask_offsets), pa.array(np.ones(n * N_CHANNELS, bool))
        ),
    }
    return pa.table(cols, schema=SCHEMA)


def _write_parquet(out: Path, domain: str, chunks, species: list[Species], counts: Counter) -> None:
    first = 0
    pending: list[pa.Table] = []
    with ShardWriter(out / domain) as writer:
        for lat, images, profiles in chunks:
            counts.update(species[s].name for s in lat.species.tolist())
            pending.append(particle_table(domain, first, lat, images, profiles, species))
            first += len(lat)
            if sum(t.num_rows for t in pending) >= writer.rows_per_group:
                writer.write_table(pa.concat_tables(pending))
                pending = []
        if pending:
            writer.write_table(pa.concat_tables(pending))


def _write_syke(
    out: Path, domain: str, chunks, species: list[Species], counts: Counter, header_px: int, um_px: float
) -> None:
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
                pid = file_stem(domain, i)
                name = species[s].name
                counts[name] += 1
                if header_px:
                    img = np.vstack([scale_bar_header(img.shape[1], header_px, um_px), img])
                (root / "images" / f"{pid}.png").write_bytes(encode_png(img))
                (root / "profiles" / f"{pid}.csv").write_text(profile_csv(prof))
                ann.writerow([f"images/{pid}.png", f"profiles/{pid}.csv", name if labelled else "", pid])
                i += 1


def _prepare_domain(out: Path, domain: str) -> None:
    """Clear ``out/<domain>`` left by an earlier ``synthesize`` run (so a rerun never mixes old
    shards or files with new ones); refuse to touch a non-empty folder that synth did not write."""
    dest = out / domain
    if not dest.exists() or not any(dest.iterdir()):
        return
    if not (out / "synth.json").is_file():
        raise FileExistsError(
            f"synth: {dest} exists, is not empty and was not written by xmodal synth (no {out / 'synth.json'}); "
            "choose an empty output folder"
        )
    shutil.rmtree(dest)


def _with_progress(domain: str, n: int, chunks: Iterator, every_s: float = 2.0) -> Iterator:
    """Pass chunks through, printing done/total, rate and ETA to stderr at most every ``every_s``."""
    t0 = last = time.perf_counter()
    done = 0
    for chunk in chunks:
        yield chunk
        done += len(chunk[0])
        now = time.perf_counter()
        if now - last >= every_s or done == n:
            last = now
            rate = done / max(now - t0, 1e-9)
            print(f"synth {domain}: {done}/{n} ({100 * done / n:.0f}%), {rate:.0f} particles/s, "
                  f"ETA {(n - done) / rate:.0f} s", file=sys.stderr)  # fmt: skip


def _check_arguments(sizes: dict[str, int], seed: int, fmt: str, image_size: int, header_px: int) -> None:
    """Refuse bad arguments before anything is written (``ConfigError``: the CLI prints one line)."""
    if fmt not in FORMATS:
        raise ConfigError(f"synth: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if seed < 0:
        raise ConfigError(f"synth: seed must be >= 0 (got {seed})")
    if image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"synth: image_size must be >= {MIN_IMAGE_SIZE} px (got {image_size})")
    if header_px and not MIN_HEADER_PX <= header_px < MAX_HEADER_ROWS:
        raise ConfigError(
            f"synth: header_px must be 0 (no header) or {MIN_HEADER_PX}..{MAX_HEADER_ROWS - 1} (got {header_px}); "
            f"ingest does not look for a scale-bar header of {MAX_HEADER_ROWS} rows or more"
        )
    for domain, n in sizes.items():
        if n < 0:
            raise ConfigError(f"synth: particle count for {domain} must be >= 0 (got {n})")


def _write_summary(out: Path, summary: dict[str, Any]) -> None:
    """``out/synth.json``, replaced in one step so that it is never half written."""
    tmp = out / "synth.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / "synth.json")


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
    header_px: int = HEADER_PX,
) -> dict[str, Any]:
    """Write a synthetic LAB/SEA/UTO data set under ``out``; returns the summary (also ``out/synth.json``).

    ``n_species`` biological taxa plus ``detritus``; taxa flagged field-only never occur in LAB.
    Domains with 0 particles are not written. Domain folders of an earlier run into ``out`` are
    replaced. ``progress`` prints periodic lines (done, rate, ETA) to stderr. ``header_px``: height of
    the scale-bar band drawn on top of every SYKE-layout crop (0: none); Parquet rows never carry it.
    """
    sizes = {"LAB": n_lab, "SEA": n_sea, "UTO": n_uto}
    _check_arguments(sizes, seed, fmt, image_size, header_px)
    species = catalogue(n_species)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        writer, header_px = _write_parquet, 0
    else:
        writer = functools.partial(_write_syke, header_px=header_px, um_px=um_per_px(image_size))
    for domain in sizes:
        _prepare_domain(out, domain)
    # a provisional synth.json before any domain is written: a run that is interrupted or fails
    # leaves it ("complete": false), so the next run into ``out`` may clear what this one wrote
    run = {"format": fmt, "seed": seed, "image_size": image_size, "header_px": header_px}
    _write_summary(out, {**run, "complete": False})
    domains: dict[str, Any] = {}
    for domain, n in sizes.items():
        if n == 0:
            continue
        counts: Counter = Counter()
        chunks = generate_chunks(domain, n, seed, image_size, species)
        writer(out, domain, _with_progress(domain, n, chunks) if progress else chunks, species, counts)
        domains[domain] = {
            "particles": n,
            "labelled": DOMAINS[domain].labelled,
            "classes": {s.name: counts[s.name] for s in species if counts[s.name]},
        }
    summary = {
        **run,
        "complete": True,
        "species": [s.name for s in species],
        "detritus": DETRITUS,
        "absent_from_lab": [s.name for s in species if not s.in_lab],
        "domains": domains,
    }
    _write_summary(out, summary)
    return summary
