"""Archive-scale benchmark (issue 8): synthetic particles -> streaming ``embed`` (Ray Data) ->
FAISS index -> search -> ``classify``, at N particles and, for the vector stages, at SCALE.

* synth: N unlabelled particles straight to Parquet (resharded into ``--shard-rows`` files) and a
  small labelled LAB gallery set;
* quick_train: a few hundred in-process CLIP steps of the small model on two shards (random
  weights map all particles to one direction; trained embeddings spread out, which is what the
  index stages must be measured on);
* embed: N/10 and N particles with that model through ``xmodal.eval.embed.embed``
  (rate and peak RSS at both sizes: time should grow ~linearly, memory stay flat), against a plain
  in-process loop (``embed_arrays`` batch by batch, no Ray) on the first shard as the baseline;
* replicate (only when SCALE > N): the N embeddings copied to SCALE particles with new ids, each copy
  moved by noise as large as the median distance to a particle's 10th neighbour (exact duplicates
  would tie, and smaller noise would make each particle's own copies its whole neighbour list); with
  ``--particles 1000000`` the real 1M embeddings are the archive;
* index: ``build_index`` (fused: two rows per particle) at N (default plan: exact; and IVF forced,
  for the growth) and SCALE (IVF): build time, recall@10 against exact search on held-out rows,
  peak RSS;
* search: queries/s of the IVF indexes at their recorded setting against exact brute force
  (``IndexFlatIP`` over the same rows) on the same queries, and the recall of those answers;
* classify: all SCALE particles against the gallery (leave-one-out calibration, all outputs).

Peak RSS is sampled from /proc every 0.2 s over this process and its descendants (the local Ray
cluster's raylet and workers); "driver" is this process alone.

    .venv/bin/python bench/bench_scale.py --work /tmp/xmodal_scale              # recorded run
    .venv/bin/python bench/bench_scale.py --work /tmp/xmodal_scale --vectors-only  # stages 4-6 again
    .venv/bin/python bench/bench_scale.py --work /tmp/x --particles 20000 --scale 100000  # quick
    .venv/bin/python bench/bench_scale.py --work /tmp/xmodal_1m --particles 1000000  # real 1M (~55 min)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow.parquet as pq

from xmodal.data.schema import iter_tables, parquet_files
from xmodal.data.synth import synthesize
from xmodal.eval.embeddings import EmbeddingSet, load_embeddings, write_embeddings
from xmodal.index.build import BuildOptions, build_index
from xmodal.index.classify import classify
from xmodal.index.search import search_index
from xmodal.index.store import load_index
from xmodal.index.vectors import kind_rows

PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree_rss(root: int) -> tuple[int, int]:
    """(RSS of ``root``, RSS of root and all its descendants) in bytes, from /proc."""
    parent: dict[int, int] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            parent[int(d)] = int(fields[1])
            rss[int(d)] = int(fields[21]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier.extend(kids)
    return rss.get(root, 0), sum(rss.get(p, 0) for p in tree)


class PeakRSS:
    """Samples RSS in a thread while the block runs."""

    def __enter__(self) -> PeakRSS:
        self.driver = self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            d, t = _tree_rss(os.getpid())
            self.driver, self.total = max(self.driver, d), max(self.total, t)
            self._stop.wait(0.2)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def gib(self) -> dict[str, float]:
        return {
            "peak_rss_driver_gib": round(self.driver / 2**30, 2),
            "peak_rss_total_gib": round(self.total / 2**30, 2),
        }


def timed(fn, *args, **kwargs) -> tuple[Any, float, dict[str, float]]:
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        dt = time.perf_counter() - t0
    return result, dt, rss.gib()


def reshard(src: Path, out: Path, rows: int, limit: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    done = 0
    for i, table in enumerate(iter_tables(src, batch_rows=rows)):
        table = table.slice(0, max(0, limit - done))
        if table.num_rows == 0:
            break
        pq.write_table(table, out / f"part-{i:05d}.parquet", compression="zstd")
        done += table.num_rows
    return out


def plain_embed(ckpt: Path, shards: list[Path]) -> int:
    """The baseline: the same model in this process, shard by shard, no Ray."""
    import torch

    from xmodal.data.pipeline import COLUMNS, table_to_model_batch
    from xmodal.eval.embed import embed_arrays, model_from_state
    from xmodal.train.checkpoint import load_checkpoint

    state = load_checkpoint(ckpt)
    cfg = state["config"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the actors' device too
    module = model_from_state(state, device)
    n = 0
    for f in shards:
        for table in iter_tables(f, columns=COLUMNS, batch_rows=256):
            batch = table_to_model_batch(
                table, cfg.data.image_size, cfg.data.profile_length, image_norm=cfg.data.image_norm
            )
            embed_arrays(module, batch, device)
            n += table.num_rows
    return n


def quick_train(cfg: Any, shards: list[Path], steps: int, batch_rows: int, seed: int) -> Any:
    """A few hundred CLIP steps in this process (no Ray): a random-weights model maps every particle
    to nearly one direction (pairwise cosine ~0.998), which no archive of a trained model looks like."""
    import torch

    from xmodal.data.pipeline import COLUMNS, table_to_model_batch
    from xmodal.data.transforms import Augment
    from xmodal.eval.embed import MODEL_KEYS
    from xmodal.models.build import build_model

    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = build_model(cfg).to(device).train()
    opt = torch.optim.AdamW(module.param_groups(cfg.optim.weight_decay), lr=cfg.optim.lr)
    aug, rng = Augment.from_config(cfg.data.augment), np.random.default_rng(seed)
    step = 0
    while step < steps:
        for f in shards:
            for table in iter_tables(f, columns=COLUMNS, batch_rows=batch_rows):
                batch = table_to_model_batch(
                    table, cfg.data.image_size, cfg.data.profile_length, aug, rng, cfg.data.image_norm
                )
                loss, _ = module({k: torch.as_tensor(batch[k]).to(device) for k in MODEL_KEYS})
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                module.after_step(step / steps)
                if step % 50 == 0 or step == steps:
                    print(f"[bench] quick_train step {step}/{steps} loss {loss.item():.3f}", flush=True)
                if step == steps:
                    return module.cpu().eval()
    return module.cpu().eval()


def tenth_neighbour_distance(src: Path, n_queries: int, seed: int) -> float:
    """Median distance (Euclidean, unit vectors) from a particle's image embedding to its 10th nearest
    other particle's, over a sample: the scale of the neighbourhoods that recall@10 is about."""
    es = load_embeddings(parquet_files(src)[0])
    x = kind_rows(es, "image").vectors
    q = x[np.random.default_rng(seed).choice(len(x), min(n_queries, len(x)), replace=False)]
    sims, _ = faiss.knn(q, x, 11, metric=faiss.METRIC_INNER_PRODUCT)
    return float(np.median(np.sqrt(np.maximum(2 - 2 * sims[:, 10], 0))))


def replicate(src: Path, out: Path, copies: int, noise: float, seed: int) -> int:
    """``copies`` of every particle with new ids, each moved by Gaussian noise of norm ~``noise``."""
    rng = np.random.default_rng(seed)
    n = 0
    for f in parquet_files(src):
        es = load_embeddings(f)
        for r in range(copies):

            def moved(x: np.ndarray) -> np.ndarray:
                y = x + noise * rng.normal(size=x.shape).astype(np.float32) / np.sqrt(x.shape[1])
                return y / np.linalg.norm(y, axis=1, keepdims=True)

            copy = EmbeddingSet(
                np.array([f"{p}~{r}" for p in es.particle_id], dtype=object),
                es.label,
                es.domain,
                moved(es.image_emb),
                es.image_valid,
                moved(es.profile_emb),
                es.profile_valid,
            )
            write_embeddings(copy, out)
            n += len(copy)
    return n


def search_speed(index_dir: Path, emb: Path, n_queries: int, seed: int) -> dict[str, Any]:
    """Queries/s at the recorded setting vs exact brute force over the same rows, same queries."""
    stored = load_index(index_dir)
    rng = np.random.default_rng(seed)
    rows = rng.choice(stored.index.ntotal, n_queries, replace=False)
    queries = stored.index.reconstruct_batch(rows)
    queries += 0.05 * rng.normal(size=queries.shape).astype(np.float32) / np.sqrt(queries.shape[1])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    ann = search_index(stored)
    t0 = time.perf_counter()
    _, found = ann.search(queries, 10)
    t_ann = time.perf_counter() - t0
    flat = faiss.IndexFlatIP(stored.index.d)
    for f in parquet_files(emb):  # the same rows in the same order as the build added them
        flat.add(kind_rows(load_embeddings(f), stored.kind).vectors)
    t0 = time.perf_counter()
    _, exact = flat.search(queries, 10)
    t_flat = time.perf_counter() - t0
    recall = float(np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(found, exact)]))
    return {
        "queries": n_queries,
        "ann_qps": round(n_queries / t_ann),
        "exact_qps": round(n_queries / t_flat),
        "speedup_vs_exact": round(t_flat / t_ann, 1),
        "recall_at_10_fresh_queries": round(recall, 4),
        "search_param": stored.meta["search_param"],
    }


def embed_stages(args: argparse.Namespace, work: Path, report) -> None:
    """Synthetic data, then streaming embedding at N/10 and N against the plain loop, and the gallery."""
    import ray
    import torch

    from xmodal.config import load_config
    from xmodal.eval.embed import embed
    from xmodal.runtime import init_ray
    from xmodal.train.checkpoint import save_checkpoint

    n = args.particles
    if not (work / "data").exists():
        _, dt, rss = timed(
            synthesize,
            work / "syn",
            n_lab=args.gallery,
            n_sea=0,
            n_uto=n,
            seed=args.seed,
            fmt="parquet",
            image_size=args.image_size,
        )
        reshard(work / "syn" / "UTO", work / "data", args.shard_rows, n)
        report(
            "synth",
            particles=n + args.gallery,
            seconds=round(dt, 1),
            per_s=round((n + args.gallery) / dt),
            **rss,
        )
    overrides = [
        f"data.image_size={args.image_size}",
        "data.profile_length=64",
        f"model.embed_dim={args.embed_dim}",
    ]
    cfg = load_config(None, overrides)
    torch.set_num_threads(os.cpu_count() or 1)
    module, dt, _ = timed(
        quick_train, cfg, parquet_files(work / "data")[-2:], args.train_steps, 128, args.seed
    )
    report("quick_train", steps=args.train_steps, seconds=round(dt, 1))
    save_checkpoint(work / "ckpt", cfg, module, 0, args.train_steps)
    init_ray(
        num_cpus=os.cpu_count(), _temp_dir=tempfile.mkdtemp(prefix="xb", dir="/tmp")
    )  # short socket paths
    shards = parquet_files(work / "data")
    small = work / "data_small"
    shutil.rmtree(small, ignore_errors=True)
    small.mkdir()
    for f in shards[: max(1, len(shards) // 10)]:
        shutil.copy(f, small / f.name)
    n_small = sum(pq.ParquetFile(f).metadata.num_rows for f in parquet_files(small))
    base_n, base_dt, _ = timed(plain_embed, work / "ckpt", parquet_files(small)[:1])
    for name, src, count in (("embed_small", small, n_small), ("embed", work / "data", n)):
        _, dt, rss = timed(embed, work / "ckpt", src, work / f"emb_{name}", batch_size=512, overwrite=True)
        report(
            name,
            particles=count,
            seconds=round(dt, 1),
            per_s=round(count / dt),
            **rss,
            plain_loop_per_s=round(base_n / base_dt),
            ratio_vs_plain=round(count / dt / (base_n / base_dt), 2),
        )
    embed(work / "ckpt", work / "syn" / "LAB", work / "emb_gallery", overwrite=True)
    ray.shutdown()


def vector_stages(args: argparse.Namespace, work: Path, report) -> None:
    """Replicate to SCALE, index at N (exact, and IVF for the growth) and SCALE, search, classify."""
    n = args.particles
    copies = max(1, args.scale // n)
    # SCALE <= N: the real embeddings are the archive, and the N index is its index
    big, scale_index = (
        (work / "emb_scale", work / "index_scale") if copies > 1 else (work / "emb_embed", work / "index")
    )
    if copies > 1 and (not big.exists() or args.replicate):
        shutil.rmtree(big, ignore_errors=True)
        noise = tenth_neighbour_distance(work / "emb_embed", 1000, args.seed)
        _, dt, _ = timed(replicate, work / "emb_embed", big, copies, noise, args.seed)
        report("replicate", particles=copies * n, noise=round(noise, 4), seconds=round(dt, 1))
    stages = [
        ("index", work / "emb_embed", n, BuildOptions(kind="fused", seed=args.seed)),
        ("index_ivf", work / "emb_embed", n, BuildOptions(kind="fused", exact_max=0, seed=args.seed)),
    ]
    if copies > 1:
        stages.append((scale_index.name, big, copies * n, BuildOptions(kind="fused", seed=args.seed)))
    for name, emb, count, options in stages:
        meta, dt, rss = timed(build_index, emb, work / name, options)
        report(
            name,
            particles=count,
            rows=meta["count"],
            type=meta["factory"],
            seconds=round(dt, 1),
            build_seconds=meta["build_seconds"],
            recall_at_10=meta["recall_at_10"],
            search_param=meta["search_param"],
            **rss,
        )
    report("search_ivf", **search_speed(work / "index_ivf", work / "emb_embed", args.queries, args.seed))
    report("search_scale", **search_speed(scale_index, big, args.queries, args.seed))
    summary, dt, rss = timed(classify, work / "emb_gallery", big, work / "classify", k=3)
    report(
        "classify_scale",
        particles=summary["particles"],
        seconds=round(dt, 1),
        per_s=round(summary["particles"] / dt),
        unknown=summary["unknown"],
        **rss,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--work",
        default=str(Path(tempfile.gettempdir()) / "xmodal_scale"),
        help="scratch folder (data, embeddings, indexes; several GB); default: TMPDIR/xmodal_scale",
    )
    ap.add_argument("--particles", type=int, default=100_000)
    ap.add_argument("--scale", type=int, default=1_000_000)
    ap.add_argument("--shard-rows", type=int, default=10_000)
    ap.add_argument("--gallery", type=int, default=2000, help="labelled LAB particles for the classify stage")
    ap.add_argument("--embed-dim", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--train-steps", type=int, default=200, help="quick CLIP training before embedding")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--vectors-only", action="store_true", help="reuse --work's embeddings: index/search/classify"
    )
    ap.add_argument("--embed-only", action="store_true", help="stop after the embedding stages")
    ap.add_argument("--replicate", action="store_true", help="with --vectors-only: rebuild the SCALE copies")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = work / "bench_scale.json"
    res: dict[str, Any] = json.loads(out.read_text()) if args.vectors_only and out.exists() else {}
    res.update(
        machine=f"{platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads)",
        args=vars(args),
        load_before=os.getloadavg(),
    )

    def report(stage: str, **values: Any) -> None:
        res[stage] = values
        print(f"[bench] {stage}: {json.dumps(values)}", flush=True)
        out.write_text(json.dumps(res, indent=1))

    if not args.vectors_only:
        embed_stages(args, work, report)
    if not args.embed_only:
        vector_stages(args, work, report)
    res["load_after"] = os.getloadavg()
    out.write_text(json.dumps(res, indent=1))
    print(f"[bench] results -> {out}")


if __name__ == "__main__":
    main()
