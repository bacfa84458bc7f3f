"""Ingest throughput vs a plain per-file reader loop, in the same run on the same machine.

    .venv/bin/python bench/bench_ingest.py [--n 6000] [--copies 25] [--workdir DIR]

* SYKE layout: ``xmodal.data.synth.synthesize`` writes ``--n`` particles (64-px PNG crops, profile
  CSVs) in the layout; the plain loop reads them as the paper's code does, per particle
  ``Image.open(...).convert("RGB")`` + ``np.loadtxt(profile, delimiter=",", skiprows=1)``.
* CytoClus export: the real Cefas export (../shared/realdata) replicated ``--copies`` times with new
  particle IDs; the plain loop is ``np.loadtxt`` of the listmode and the pulses, a Python loop that
  cuts the pulses into particles at the separator rows, and PIL for every crop.

ingest does more than the plain loops (every check, quarantine, Parquet output); they do no
validation and write nothing. Both sides read from a warm page cache (one untimed read first).
Wall time (ingest as a user runs it: up to 2 worker processes, started where the runner measures
that they pay, ``xmodal/data/runner.py``; its choice is printed) is what a user waits for; CPU time
(ingest in-process, ``workers=1``, so that all of its work is counted) compares the work per
particle, and is the fairer number on a shared machine, where wall time also measures the
neighbours (load average printed).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from xmodal.data.ingest import ingest
from xmodal.data.synth import synthesize

REALDATA = Path(
    os.environ.get("XMODAL_REALDATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "realdata")
)
CEFAS = (
    REALDATA
    / "cytosense_cefas_pond_ecotaxa_pipeline"
    / "original"
    / "Pond_NA 2023-05-24 09h23_All Imaged Particles"
)


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def timed(fn) -> tuple[int, float, float]:
    """-> (particles, wall s, CPU s)."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t0, cpu_seconds() - c0


def warm(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            p.read_bytes()


def plain_syke(layout: Path) -> int:
    table = pd.read_csv(layout / "annotations.csv")
    shapes = []
    for image, profile in zip(table["image"], table["profile"]):
        img = Image.open(layout / image).convert("RGB")
        prof = np.loadtxt(layout / profile, delimiter=",", skiprows=1)
        shapes.append((img.size, prof.shape))
    return len(shapes)


def replicate_cefas(dest: Path, copies: int) -> Path:
    """The Cefas export ``copies`` times over, particle IDs offset by k * 10**6 (files keep their format)."""
    dest.mkdir(parents=True)
    prefix = dest / CEFAS.name
    lm_head, _, lm_body = Path(f"{CEFAS}_Listmode.csv").read_bytes().partition(b"\n")
    pu_head, _, pu_body = Path(f"{CEFAS}_Pulses.csv").read_bytes().partition(b"\n")
    lm_lines = [ln.split(b",", 1) for ln in lm_body.split(b"\r\n") if ln.strip()]
    pu_lines = [ln.split(b",", 1) for ln in pu_body.split(b"\r\n") if ln.strip()]
    images = dest / f"{CEFAS.name}_Images"
    images.mkdir()
    crops = sorted(Path(f"{CEFAS}_Images").glob("*_Cropped_*.jpg"))
    with open(f"{prefix}_Listmode.csv", "wb") as lm, open(f"{prefix}_Pulses.csv", "wb") as pu:
        lm.write(lm_head + b"\n")
        pu.write(pu_head + b"\n")
        for k in range(copies):
            off = k * 10**6
            lm.write(b"".join(b"%d,%s\r\n" % (int(i) + off, rest) for i, rest in lm_lines))
            pu.write(b"".join(b"%d,%s\r\n" % (int(i) + off if int(i) else 0, rest) for i, rest in pu_lines))
            for crop in crops:
                pid = int(crop.stem.rsplit("_", 1)[1])
                shutil.copy(crop, images / crop.name.replace(f"_{pid}.jpg", f"_{pid + off}.jpg"))
    return prefix


def plain_cytoclus(prefix: Path) -> int:
    listmode = np.loadtxt(f"{prefix}_Listmode.csv", delimiter=",", skiprows=1, usecols=(0, 1))
    pulses = np.loadtxt(f"{prefix}_Pulses.csv", delimiter=",", skiprows=1)
    particles: dict[int, np.ndarray] = {}
    start = 0
    for i in range(len(pulses) + 1):  # a particle ends at a pair of all-zero rows
        if i == len(pulses) or (not pulses[i].any() and i + 1 < len(pulses) and not pulses[i + 1].any()):
            if i > start:
                particles[int(pulses[start, 0])] = pulses[start:i, 1:]
            start = i + 2
    for crop in Path(f"{prefix}_Images").glob("*_Cropped_*.jpg"):
        Image.open(crop).convert("RGB")
    assert len(particles) == len(listmode)
    return len(particles)


def compare(name: str, plain_fn, ingest_fn) -> str:
    """One table row: plain loop vs ingest as run by default (2 workers, the runner's choice) and
    in-process (``workers=1``). ``ingest_fn(workers)`` returns the report."""
    n, plain_wall, plain_cpu = timed(plain_fn)
    report, pool_wall, _ = timed(lambda: ingest_fn(2))
    m1, serial_wall, serial_cpu = timed(lambda: ingest_fn(1).ingested)
    assert n == report.ingested == m1, (n, report.ingested, m1)
    choice = "/".join(sorted({d.runner for d in report.domains.values()}))
    return (
        f"| {name} | {n} | {n / plain_wall:,.0f} | {n / pool_wall:,.0f} (**{plain_wall / pool_wall:.1f}x**, {choice}) | "
        f"{n / serial_wall:,.0f} ({plain_wall / serial_wall:.1f}x) | {n / plain_cpu:,.0f} | {n / serial_cpu:,.0f} | "
        f"**{plain_cpu / serial_cpu:.1f}x** |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=6000, help="synthetic SYKE particles")
    ap.add_argument("--copies", type=int, default=25, help="replicas of the real Cefas export (817 each)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_ingest_", dir=args.workdir))
    load = os.getloadavg()
    try:
        rows = []
        # no scale-bar band: the plain loop would keep it, ingest would cut it and encode each crop again
        synthesize(work / "syke", 0, 0, args.n, seed=0, fmt="syke", header_px=0)
        layout = work / "syke" / "UTO"
        warm(layout)
        run_syke = lambda w: ingest(layout, work / "out_syke", quiet=True, workers=w)  # noqa: E731
        rows.append(compare("SYKE layout (synth, 64 px)", lambda: plain_syke(layout), run_syke))
        if Path(f"{CEFAS}_Pulses.csv").is_file():
            prefix = replicate_cefas(work / "cytoclus", args.copies)
            warm(prefix.parent)
            run_cc = lambda w: ingest(prefix.parent, work / "out_cc", quiet=True, workers=w)  # noqa: E731
            rows.append(
                compare(f"CytoClus (real Cefas x{args.copies})", lambda: plain_cytoclus(prefix), run_cc)
            )
        else:
            print(f"skipping CytoClus: real Cefas export not found at {CEFAS}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"machine: {platform.machine()} {os.cpu_count()} CPUs, {platform.python_implementation()} "
        f"{platform.python_version()}, ingest workers 2; load average before/after "
        f"{load[0]:.1f}/{os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| input | particles | plain loop wall p/s | ingest (2 workers, runner's choice), wall p/s (ratio) "
        "| ingest in-process wall p/s (ratio) | plain loop CPU p/s | ingest in-process CPU p/s | CPU ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
