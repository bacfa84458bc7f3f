"""Synthetic generator throughput (particles/s per core) against a plain per-particle loop.

    .venv/bin/python bench/bench_synth.py [--n 4096] [--image-size 64] [--baseline-n 256]

Runs single-threaded (BLAS, Arrow) so that the rate is per core, and reports CPU seconds (not wall
time, which other processes on a shared machine inflate) next to wall time. Stages:

* vectorised: ``synthesize(fmt="parquet")`` end to end, plus where its time goes;
* plain loop: the same renderers called one particle at a time, Pillow's PNG encoder, and one
  ``make_record`` + ``ShardWriter.write`` per particle — how a straightforward generator is written;
* demo: LAB 1200, SEA 600, UTO 4000 at 64 px in both layouts.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import io  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from PIL import Image  # noqa: E402

from xmodal.data.schema import ShardWriter, make_record  # noqa: E402
from xmodal.data.synth import encode_png, particle_id, particle_table, synthesize  # noqa: E402
from xmodal.data.synth_image import render_images  # noqa: E402
from xmodal.data.synth_latents import Latents, sample_latents  # noqa: E402
from xmodal.data.synth_profile import render_profiles  # noqa: E402
from xmodal.data.synth_species import DOMAINS, catalogue, class_weights  # noqa: E402


class Clock:
    """CPU and wall seconds of a block."""

    def __enter__(self) -> Clock:
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu = time.process_time() - self.cpu0
        self.wall = time.perf_counter() - self.wall0


def one(lat: Latents, i: int) -> Latents:
    return Latents(**{f: getattr(lat, f)[i : i + 1] for f in Latents.__dataclass_fields__})


def pil_png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def stages(n: int, image_size: int, domain: str) -> dict[str, float]:
    """CPU seconds per stage of the vectorised path for ``n`` particles."""
    species, style = catalogue(12), DOMAINS[domain]
    rng = np.random.default_rng(0)
    out: dict[str, float] = {}
    with Clock() as c:
        lat = sample_latents(species, class_weights(species, style), n, style, rng)
    out["latents"] = c.cpu
    with Clock() as c:
        images = render_images(lat, image_size, style, rng)
    out["images"] = c.cpu
    with Clock() as c:
        profiles = render_profiles(lat, style, rng)
    out["profiles"] = c.cpu
    with Clock() as c:
        [encode_png(im) for im in images]
    out["png"] = c.cpu
    with Clock() as c:
        particle_table(domain, 0, lat, images, profiles, species)
    out["table (incl. png)"] = c.cpu
    return out


def plain_loop(n: int, image_size: int, domain: str, out: Path) -> Clock:
    species, style = catalogue(12), DOMAINS[domain]
    rng = np.random.default_rng(0)
    lat = sample_latents(species, class_weights(species, style), n, style, rng)
    with Clock() as c, ShardWriter(out) as writer:
        for i in range(n):
            p = one(lat, i)
            img = render_images(p, image_size, style, rng)[0]
            prof = render_profiles(p, style, rng)[0]
            name = species[int(p.species[0])].name
            writer.write(
                make_record(particle_id(domain, i), domain, domain, name, pil_png(img), img.shape, prof)
            )
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096, help="particles for the vectorised run (UTO)")
    ap.add_argument("--baseline-n", type=int, default=256, help="particles for the plain loop")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--skip-demo", action="store_true")
    args = ap.parse_args()
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
          f"python {platform.python_version()}, numpy {np.__version__}, 1 thread")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(Path(tmp) / "warm", 0, 0, 64, fmt="parquet", image_size=args.image_size)
        with Clock() as vec:
            synthesize(Path(tmp) / "vec", 0, 0, args.n, fmt="parquet", image_size=args.image_size)
        rate = args.n / vec.cpu
        print(f"vectorised  fmt=parquet  {args.n} particles @ {args.image_size}px: {vec.cpu:.2f} s CPU "
              f"({vec.wall:.2f} s wall) -> {rate:,.0f} particles/s per core")  # fmt: skip
        for stage, sec in stages(args.n, args.image_size, "UTO").items():
            print(f"    {stage:18s} {sec:6.2f} s CPU  ({args.n / sec:,.0f}/s)")
        base = plain_loop(args.baseline_n, args.image_size, "UTO", Path(tmp) / "plain")
        base_rate = args.baseline_n / base.cpu
        print(f"plain loop  per particle, Pillow PNG, make_record  {args.baseline_n} particles: "
              f"{base.cpu:.2f} s CPU -> {base_rate:,.0f} particles/s per core")  # fmt: skip
        print(f"ratio vectorised / plain: {rate / base_rate:.1f}x")
        if not args.skip_demo:
            for fmt in ("parquet", "syke"):
                with Clock() as demo:
                    synthesize(Path(tmp) / f"demo-{fmt}", 1200, 600, 4000, fmt=fmt, image_size=64)
                print(f"demo LAB 1200 + SEA 600 + UTO 4000 @ 64px, fmt={fmt}: {demo.cpu:.1f} s CPU, "
                      f"{demo.wall:.1f} s wall")  # fmt: skip


if __name__ == "__main__":
    main()
