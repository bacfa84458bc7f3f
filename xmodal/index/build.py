"""``xmodal index build``: a FAISS index over an embeddings folder, streamed shard by shard.

Up to ``exact_max`` rows the index is exact (inner product on unit rows = cosine). Above it
``approx`` chooses:

* ``ivf-flat`` (default): k-means lists (nlist ~ 4 sqrt(rows), at most one per 39 training rows)
  trained on a seeded sample; vectors kept exactly, so recall is bought with ``nprobe`` alone;
* ``ivf-pq``: the same lists, vectors compressed to ``pq_m`` bytes (memory over recall);
* ``hnsw``: a neighbour graph with M links per row; no training, CPU only.

The search parameter (``nprobe`` / ``efSearch``) is the first on a doubling ladder whose recall@10
against exact search on a held-out sample reaches ``target_recall``; every value tried is recorded.
Held-out rows are kept out of the training sample and excluded from their own neighbour lists, so
the recall is that of a new particle's query. On small data the held-out queries take at most half
the sample, and fewer when the lists need the rows: k-means keeps 39 rows per list (FAISS's
minimum for a fair fit) and, for IVF-PQ, the 256 its codebooks need.

Two passes over the shards, each holding one shard in memory: (1) count rows, build the id map
and draw the sample; (2) add rows to the trained index while the held-out queries' exact
neighbours are accumulated. Peak memory is the index plus one shard.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from xmodal.config import ConfigError
from xmodal.data.quarantine import DataError
from xmodal.data.schema import parquet_files
from xmodal.eval.embeddings import CHECKPOINT_KEY as CHECKPOINT_KEY  # kept importable from here
from xmodal.eval.embeddings import embeddings_checkpoint, load_embeddings
from xmodal.eval.progress import ProgressLog
from xmodal.index.device import GPU_MAX_K, gpu_clustering_index, gpu_count, set_search_param, to_search_device
from xmodal.index.store import ID_SCHEMA, save_index
from xmodal.index.vectors import kind_rows, modalities

APPROX = ("ivf-flat", "ivf-pq", "hnsw")
RECALL_K = 10
MIN_PER_LIST = 39  # training rows per IVF list below which FAISS's k-means warns
MIN_PQ_TRAIN = 256  # PQ codebooks of 8 bits: 256 centroids, each needs a training row


@dataclass
class BuildOptions:
    kind: str = "fused"  # image | profile | fused (both embeddings of each particle as rows)
    exact_max: int = 200_000  # rows up to which the index is exact (IndexFlatIP)
    approx: str = "ivf-flat"  # above exact_max: ivf-flat | ivf-pq | hnsw
    nlist: int = 0  # IVF lists; 0 = 4 sqrt(rows)
    pq_m: int = 0  # IVF-PQ bytes per vector (sub-quantizers, 8 bits each); 0 = dim / 2
    hnsw_m: int = 32
    ef_construction: int = 80
    train_size: int = 0  # k-means sample; 0 = 50 x nlist; never below 39 x nlist (and 256 for PQ)
    holdout: int = 1000  # held-out queries for recall@10
    target_recall: float = 0.97
    seed: int = 0
    use_gpu: bool | None = None  # None = when faiss sees a GPU
    checkpoint: str = ""  # recorded in meta.json; default: what `xmodal embed` wrote in the shards


@dataclass
class _Scan:
    """Pass 1: what the shards hold, and the sample (global row numbers and vectors)."""

    files: list[Path]
    ids: pa.Table
    dim: int
    sample_rows: np.ndarray
    sample: np.ndarray
    left_out: int  # particles without any embedding of the kind: not in the index


def _sample_size(upper: int, o: BuildOptions) -> int:
    """Rows to sample for ``upper`` rows at most: held-out queries plus the largest training sample
    the plan could ask for (none for an exact index, nor for HNSW)."""
    if upper <= o.exact_max:
        return 0
    if o.approx == "hnsw":
        return o.holdout
    nlist = o.nlist or int(round(4 * math.sqrt(upper)))
    return o.holdout + max(o.train_size or 50 * nlist, _min_train(o.approx, nlist))


def _scan(files: list[Path], kind: str, want: int, seed: int, log: ProgressLog) -> _Scan:
    upper = sum(pq.ParquetFile(f).metadata.num_rows for f in files) * len(modalities(kind))
    p = min(1.0, 1.5 * want / max(upper, 1))  # Bernoulli rate that leaves a margin over `want`
    rng = np.random.default_rng(seed)
    tables, sample_rows, sample, dims = [], [], [], set()
    rows_so_far = particles_so_far = left_out = 0
    for f in files:
        es = load_embeddings(f)
        rows = kind_rows(es, kind, where=str(f))
        if len(rows.particle):
            dims.add(rows.vectors.shape[1])
        tables.append(
            pa.table(
                {
                    "particle": pa.array(rows.particle + particles_so_far, type=pa.int64()),
                    "particle_id": pa.array(es.particle_id[rows.particle].tolist(), type=pa.string()),
                    "label": pa.array(es.label[rows.particle].tolist(), type=pa.string()),
                    "domain": pa.array(es.domain[rows.particle].tolist(), type=pa.string()),
                    "modality": pa.array(rows.modality.tolist(), type=pa.string()),
                },
                schema=ID_SCHEMA,
            )
        )
        picked = np.flatnonzero(rng.random(len(rows.particle)) < p)
        sample_rows.append(picked + rows_so_far)
        sample.append(rows.vectors[picked])
        rows_so_far += len(rows.particle)
        particles_so_far += len(es)
        left_out += len(es) - len(np.unique(rows.particle))
        log.update(len(es))
    if len(dims) > 1:
        raise DataError(
            f"embeddings under {files[0].parent} have different widths {sorted(dims)}; "
            "they come from different models: index each model's embeddings separately"
        )
    if rows_so_far == 0:
        raise DataError(
            f"no {kind} embeddings in {len(files)} file(s) under {files[0].parent}; choose another --kind"
        )
    ids = pa.concat_tables(tables)
    _check_unique(ids, modalities(kind), files[0].parent)
    return _Scan(files, ids, dims.pop(), np.concatenate(sample_rows), np.concatenate(sample), left_out)


def _check_unique(ids: pa.Table, mods: tuple[str, ...], where: Path) -> None:
    """A particle twice in an index would be its own nearest neighbour (and vote for itself)."""
    for m in mods:
        pid = ids.filter(pc.equal(ids.column("modality"), m)).column("particle_id")
        counts = pc.value_counts(pid)
        dup = counts.filter(pc.greater(counts.field("counts"), 1))
        if len(dup):
            raise DataError(
                f"{where}: {len(dup)} particle ids occur in more than one shard "
                f"(e.g. {dup.field('values')[0]}); remove the duplicate shards first"
            )


def _plan(rows: int, dim: int, o: BuildOptions, sampled: int) -> tuple[str, str, dict[str, Any], int]:
    """(index type, FAISS factory string, its parameters, held-out queries) for ``rows`` vectors of
    width ``dim`` of which ``sampled`` were drawn (held-out queries and training rows)."""
    if rows <= o.exact_max:
        return "flat", "Flat", {}, 0
    if o.approx not in APPROX:
        raise ConfigError(f"unknown approximate index {o.approx!r}; choose one of {', '.join(APPROX)}")
    if o.approx == "hnsw":
        params = {"hnsw_m": o.hnsw_m, "ef_construction": o.ef_construction}
        return "hnsw", f"HNSW{o.hnsw_m},Flat", params, min(o.holdout, max(0, sampled - 1))
    hold = min(o.holdout, sampled // 2)
    # 4 sqrt(rows) lists, but no more than the training rows fit at MIN_PER_LIST each
    nlist = o.nlist or max(1, min(int(round(4 * math.sqrt(rows))), (sampled - hold) // MIN_PER_LIST))
    params: dict[str, Any] = {"nlist": nlist}
    if o.approx == "ivf-flat":
        spec = f"IVF{nlist},Flat"
    else:
        m = o.pq_m or max(1, dim // 2)
        if dim % m:
            raise ConfigError(f"--pq-m {m} must divide the embedding width {dim}")
        params["pq_m"] = m
        # "np": no polysemous training (a slow annealing for Hamming filtering, which search never uses)
        spec = f"IVF{nlist},PQ{m}x8np"
    need = _min_train(o.approx, nlist)
    if sampled < need:
        fix = (
            f"lower --nlist to at most {sampled // MIN_PER_LIST}"
            if o.nlist and sampled >= _min_train(o.approx, 1)
            else "use --approx hnsw"
        )
        raise ConfigError(
            f"{o.approx} with {nlist} list(s) needs {need:,} training rows ({MIN_PER_LIST} per list"
            + (f", at least {MIN_PQ_TRAIN} for the PQ codebooks" if o.approx == "ivf-pq" else "")
            + f"), but there are {sampled:,} rows to train on: {fix}, or raise --exact-max to "
            f"{rows:,} or more to keep the index exact"
        )
    return o.approx, spec, params, min(hold, sampled - need)  # fewer held out when training needs them


def _min_train(approx: str, nlist: int) -> int:
    """Training rows an IVF index of ``nlist`` lists needs."""
    need = MIN_PER_LIST * nlist
    return max(need, MIN_PQ_TRAIN) if approx == "ivf-pq" else need


class _ExactTopK:
    """Exact top-``k`` inner products of fixed queries over rows arriving in batches."""

    def __init__(self, queries: np.ndarray, k: int):
        self.queries, self.k = queries, k
        self.sims = np.full((len(queries), k), -np.inf, dtype=np.float32)
        self.ids = np.full((len(queries), k), -1, dtype=np.int64)

    def update(self, rows: np.ndarray, offset: int) -> None:
        if len(self.queries) == 0 or len(rows) == 0:
            return
        sims, ids = faiss.knn(self.queries, rows, min(self.k, len(rows)), metric=faiss.METRIC_INNER_PRODUCT)
        both_s = np.concatenate([self.sims, sims], axis=1)
        both_i = np.concatenate([self.ids, ids + offset], axis=1)
        order = np.argsort(-both_s, axis=1, kind="stable")[:, : self.k]
        self.sims = np.take_along_axis(both_s, order, axis=1)
        self.ids = np.take_along_axis(both_i, order, axis=1)


def recall_at_k(found: np.ndarray, exact: np.ndarray, self_rows: np.ndarray, k: int = RECALL_K) -> float:
    """Mean |found top-k ∩ exact top-k| / k, each list with the query's own row removed first."""
    hits = 0
    for f, e, s in zip(found, exact, self_rows):
        want = e[(e != s) & (e >= 0)][:k]
        got = f[(f != s) & (f >= 0)][:k]
        hits += len(np.intersect1d(want, got)) / max(len(want), 1)
    return hits / max(len(found), 1)


def _ladder(index_type: str, params: dict[str, Any], n_gpus: int) -> tuple[str, list[int]]:
    if index_type == "hnsw":
        return "efSearch", [16, 32, 64, 128, 256, 512, 1024, 2048]
    top = min(params["nlist"], GPU_MAX_K) if n_gpus else params["nlist"]  # GPU IVF probes at most 2048 lists
    values = [2**i for i in range(int(math.log2(top)) + 1)]
    return "nprobe", values if values[-1] == top else [*values, top]


def _tune(
    search_index: faiss.Index,
    index_type: str,
    params: dict[str, Any],
    queries: np.ndarray,
    self_rows: np.ndarray,
    exact: np.ndarray,
    target: float,
    n_gpus: int,
) -> tuple[str, int, float, list[dict]]:
    """The first ladder value reaching ``target`` recall@10 (else the last tried)."""
    name, values = _ladder(index_type, params, n_gpus)
    curve: list[dict[str, Any]] = []
    for v in values:
        set_search_param(search_index, name, v)
        t0 = time.perf_counter()
        _, found = search_index.search(queries, RECALL_K + 1)
        dt = time.perf_counter() - t0
        r = recall_at_k(found, exact, self_rows)
        curve.append(
            {name: v, "recall_at_10": round(r, 4), "queries_per_s": round(len(queries) / max(dt, 1e-9))}
        )
        if r >= target:
            break
    return name, curve[-1][name], curve[-1]["recall_at_10"], curve


def build_index(
    embeddings: str | Path, out: str | Path, options: BuildOptions | None = None
) -> dict[str, Any]:
    """Build, measure and save an index of ``embeddings`` (folder or file) into ``out``; returns meta."""
    o = options or BuildOptions()
    files = parquet_files(embeddings)
    recorded = embeddings_checkpoint(embeddings)  # also refuses particles, and shards of several models
    n_gpus = gpu_count(o.use_gpu)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    scan = _scan(
        files,
        o.kind,
        _sample_size(total * len(modalities(o.kind)), o),
        o.seed,
        ProgressLog("index scan", total),
    )
    rows = scan.ids.num_rows
    index_type, spec, params, n_hold = _plan(rows, scan.dim, o, len(scan.sample_rows))
    timings["scan_s"] = time.perf_counter() - t0

    # the held-out queries, then the training sample from the rest (seeded, without replacement)
    rng = np.random.default_rng(o.seed + 1)
    order = rng.permutation(len(scan.sample_rows))
    hold, rest = order[:n_hold], order[n_hold:]
    index = faiss.index_factory(scan.dim, spec, faiss.METRIC_INNER_PRODUCT)
    t1 = time.perf_counter()
    if index_type in ("ivf-flat", "ivf-pq"):
        wanted = max(o.train_size or 50 * params["nlist"], _min_train(index_type, params["nlist"]))
        train_n = min(len(rest), wanted)
        train = scan.sample[np.sort(rest[:train_n])]
        ivf = faiss.extract_index_ivf(index)
        clustering = gpu_clustering_index(scan.dim, n_gpus)
        if clustering is not None:
            ivf.clustering_index = clustering
        where = (
            f"{n_gpus} GPU(s)" if clustering is not None else f"{faiss.omp_get_max_threads()} CPU thread(s)"
        )
        print(f"[xmodal] index: training {spec} on {train_n:,} sampled rows ({where})", flush=True)
        index.train(train)
        ivf.clustering_index = None  # a GPU object must not be written with the index
        params.update(train_size=int(train_n), train_seed=o.seed)
    elif index_type == "hnsw":
        index.hnsw.efConstruction = o.ef_construction
    timings["train_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    queries = scan.sample[hold]
    exact = _ExactTopK(queries, RECALL_K + 1)
    log = ProgressLog("index add", rows, unit="rows")
    offset = 0
    for f in files:
        vecs = kind_rows(load_embeddings(f), o.kind, where=str(f)).vectors
        index.add(vecs)
        exact.update(vecs, offset)
        offset += len(vecs)
        log.update(len(vecs))
    if offset != rows:
        raise RuntimeError(
            f"{embeddings} changed while the index was built ({rows} rows, then {offset}); rebuild"
        )
    timings["add_s"] = time.perf_counter() - t2

    recall, curve, search_param = 1.0, [], {}
    if index_type != "flat" and n_hold:
        t3 = time.perf_counter()
        search_index = to_search_device(index, n_gpus)
        name, value, recall, curve = _tune(
            search_index,
            index_type,
            params,
            queries,
            scan.sample_rows[hold],
            exact.ids,
            o.target_recall,
            n_gpus,
        )
        set_search_param(index, name, value)  # stored with the CPU index
        search_param = {name: value}
        timings["tune_s"] = time.perf_counter() - t3
    meta = {
        "embeddings": str(Path(embeddings).resolve()),
        "checkpoint": o.checkpoint or (recorded.path if recorded else ""),
        # identifies the model wherever its file lies (see Checkpoint); unknown for a checkpoint given by hand
        "checkpoint_sha256": "" if o.checkpoint or recorded is None else recorded.sha256,
        "kind": o.kind,
        "dim": scan.dim,
        "count": rows,
        "particles": int(pc.count_distinct(scan.ids.column("particle")).as_py()),
        "particles_left_out": scan.left_out,
        "index_type": index_type,
        "factory": spec,
        "params": {**params, **search_param},
        "search_param": search_param,
        "recall_at_10": recall,
        "recall_holdout": int(n_hold),
        "target_recall": o.target_recall if index_type != "flat" else None,
        "recall_curve": curve,
        "gpus": n_gpus,
        "build_seconds": {k: round(v, 2) for k, v in timings.items()},
        "options": asdict(o),
        "faiss_version": faiss.__version__,
    }
    save_index(out, index, scan.ids, meta)
    print(
        f"[xmodal] index {index_type} ({spec}) of {rows:,} {o.kind} rows, dim {scan.dim}, "
        f"recall@10 {recall:.3f}{' (exact)' if index_type == 'flat' else ''} "
        f"in {sum(timings.values()):.1f}s -> {out}"
    )
    if scan.left_out:  # said, not silent: these particles can never be found in this index
        what = " or ".join(modalities(o.kind))
        print(
            f"[xmodal] index: {scan.left_out:,} of {total:,} particles have no {what} embedding and are "
            "left out of the index"
            + (" (--kind fused indexes each particle by what it has)" if o.kind != "fused" else "")
        )
    if index_type != "flat" and recall < o.target_recall:
        print(
            f"[xmodal] warning: recall@10 {recall:.3f} is below the target {o.target_recall} at the "
            f"largest {next(iter(search_param))} tried; use more lists/links or approx=ivf-flat/hnsw"
        )
    return meta
