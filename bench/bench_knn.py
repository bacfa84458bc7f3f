"""Gallery k-NN protocol benchmark (issue 6): xmodal's FAISS path vs a scikit-learn brute-force path.

The full protocol - 9 gallery-query combinations x 5 gallery sizes x 5 repeats, k = 3 - in split mode
on synthetic embeddings (default: 20 classes, 512-d, a 100-per-class gallery pool, 20k queries).

* FAISS path: ``xmodal.eval.protocol.run_protocol`` end to end (sampling, search, vote, metrics).
* Baseline: the authors' algorithm (their ``src/benchmark.py``) on the same galleries: per repeat and
  gallery size, ``NearestNeighbors(metric="cosine", algorithm="brute")`` fitted on the image, the
  profile and the concatenated gallery, ``kneighbors`` for image / profile / both queries, then the
  same vote (``xmodal.eval.knn.vote``). Only search + vote are timed for it (no metrics).
  On float64 inputs both paths compute the same exact predictions: every prediction of every cell
  and repeat is compared, and any difference fails the run. The same baseline on float32 inputs
  (what the authors ran) is timed too; its rounding changes some near-tied predictions, which are
  counted, not asserted.

    .venv/bin/python bench/bench_knn.py                 # the recorded configuration
    .venv/bin/python bench/bench_knn.py --queries 2000  # a quick check
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time

import numpy as np
from sklearn.neighbors import NearestNeighbors

from xmodal.eval.embeddings import EmbeddingSet
from xmodal.eval.knn import l2_normalize, vote
from xmodal.eval.protocol import COMBOS, ProtocolResult, parse_combo, run_protocol

SIZES = (1, 2, 4, 8, 16)
K = 3


def make_set(
    n: int, centres: np.ndarray, noise: float, rng: np.random.Generator, prefix: str
) -> EmbeddingSet:
    """Particles around class centres; image and profile embeddings share the class signal."""
    y = rng.integers(0, len(centres), n)
    return EmbeddingSet(
        particle_id=np.array([f"{prefix}{i}" for i in range(n)], dtype=object),
        label=np.array([f"class{c:02d}" for c in y], dtype=object),
        domain=np.full(n, prefix, dtype=object),
        image_emb=(centres[y] + noise * rng.normal(size=(n, centres.shape[1]))).astype(np.float32),
        image_valid=np.ones(n, bool),
        profile_emb=(centres[y] + noise * rng.normal(size=(n, centres.shape[1]))).astype(np.float32),
        profile_valid=np.ones(n, bool),
    )


def sklearn_protocol(
    gallery: EmbeddingSet, queries: EmbeddingSet, result: ProtocolResult, dtype: type = np.float64
) -> dict:
    """The authors' loop on the galleries ``result`` drew; returns {(combo, n, run): predictions}."""
    classes = {c: i for i, c in enumerate(result.classes)}
    g_codes = np.array([classes[c] for c in gallery.label])
    g = {m: l2_normalize(gallery.emb(m)).astype(dtype) for m in ("image", "profile")}
    q = {m: l2_normalize(queries.emb(m)).astype(dtype) for m in ("image", "profile")}
    out = {}
    for n in result.gallery_sizes:
        for run, kept in enumerate(result.cell("I-I", n, K).predictions):
            idx = kept["gallery"]
            fits = {
                "I": (g["image"][idx],),
                "P": (g["profile"][idx],),
                "I+P": (g["image"][idx], g["profile"][idx]),
            }
            for side, parts in fits.items():
                predictor = NearestNeighbors(n_neighbors=K, metric="cosine", algorithm="brute")
                predictor.fit(np.concatenate(parts))
                labels = np.tile(g_codes[idx], len(parts))
                k = min(K, len(labels))
                for qside in ("I", "P", "I+P"):
                    dists, nbrs = [], []
                    for m in parse_combo(f"I-{qside}")[1]:
                        d, i = predictor.kneighbors(q[m], n_neighbors=k)
                        dists.append(d)
                        nbrs.append(i)
                    distances = np.hstack(dists).astype(np.float64)
                    pred, _ = vote(labels[np.hstack(nbrs)], distances, len(result.classes))
                    out[(f"{side}-{qside}", n, run)] = pred
    return out


class Timer:
    """Wall seconds and process CPU seconds (all threads): the machine is shared, so wall time also
    measures the neighbours' jobs; CPU time is the work done."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def ratio(self, other: Timer) -> str:
        return f"{self.wall / other.wall:.1f}x wall, {self.cpu / other.cpu:.1f}x CPU"

    def __str__(self) -> str:
        return f"{self.wall:.1f} s wall, {self.cpu:.1f} s CPU"


def compare(result: ProtocolResult, baseline: dict) -> tuple[int, int]:
    """(predictions compared, predictions that differ) over every cell and repeat."""
    compared = mismatched = 0
    for (combo, n, _k), cell in result.cells.items():
        for run, kept in enumerate(cell.predictions):
            other = baseline[(combo, n, run)]
            compared += len(other)
            mismatched += int((kept["pred"] != other).sum())
    return compared, mismatched


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{os.cpu_count()} cores, {model}, no GPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=20_000)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--pool-per-class", type=int, default=100, help="gallery pool size per class")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--noise", type=float, default=3.0, help="within-class spread (sets the accuracy level)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-float32-baseline", action="store_true", help="skip timing sklearn on float32 inputs")
    args = p.parse_args()

    rng = np.random.default_rng(args.seed)
    centres = rng.normal(size=(args.classes, args.dim)) / np.sqrt(args.dim)
    noise = args.noise / np.sqrt(args.dim)
    gallery = make_set(args.classes * args.pool_per_class, centres, noise, rng, "G")
    queries = make_set(args.queries, centres, noise, rng, "Q")
    print(
        f"[bench_knn] {machine()}; {len(queries)} queries, gallery pool {len(gallery)}, {args.classes} classes, "
        f"{args.dim}-d; {len(COMBOS)} combos x {len(SIZES)} sizes x {args.repeats} repeats, k={K}"
    )

    with Timer() as t_faiss:
        result = run_protocol(
            gallery, queries, COMBOS, SIZES, K, args.repeats, args.seed, progress=False, keep_predictions=True
        )
    print(f"[bench_knn] FAISS path (xmodal run_protocol): {t_faiss}")
    with Timer() as t_sklearn:
        baseline = sklearn_protocol(gallery, queries, result)
    print(f"[bench_knn] sklearn NearestNeighbors brute path, float64 (search + vote only): {t_sklearn}")
    compared, mismatched = compare(result, baseline)
    assert mismatched == 0, f"{mismatched} of {compared} predictions differ between FAISS and sklearn"
    print(
        f"[bench_knn] identical predictions: {compared} of {compared} ({len(result.cells)} cells x {args.repeats} repeats)"
    )
    print(f"[bench_knn] speed-up FAISS path vs sklearn float64 path: {t_sklearn.ratio(t_faiss)}")
    if not args.no_float32_baseline:
        with Timer() as t_sklearn32:
            baseline32 = sklearn_protocol(gallery, queries, result, np.float32)
        _, differ = compare(result, baseline32)
        print(
            f"[bench_knn] sklearn path on float32 inputs (the authors' setting): {t_sklearn32}; {differ} of "
            f"{compared} predictions differ from exact (float32 rounding of near ties)"
        )
        print(f"[bench_knn] speed-up FAISS path vs sklearn float32 path: {t_sklearn32.ratio(t_faiss)}")
    for combo in ("I-I", "P-P", "I+P-I+P"):
        accs = " ".join(f"n={n}: {100 * result.cell(combo, n).mean():.1f}" for n in SIZES)
        print(f"[bench_knn] accuracy % {combo}: {accs}")


if __name__ == "__main__":
    main()
