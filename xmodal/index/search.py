"""``xmodal index search``: the top-k neighbour particles (ids, cosine scores, labels) of particles
already in an index (by id) or of new particles (an embeddings folder).

A query particle may have two query vectors (image, profile) and a fused index two rows per
particle; a neighbour particle's score is its best similarity over all those pairs, and each
particle is listed once. Every query vector fetches ``rows_per_particle x (k + 1)`` rows, which
provably holds the top ``k`` distinct particles other than the query itself: rows ranked above a
top-k particle's best row belong to at most k other particles, each with at most that many rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from xmodal.config import ConfigError
from xmodal.data.quarantine import DataError
from xmodal.data.schema import parquet_files
from xmodal.eval.embeddings import check_same_checkpoint, embeddings_checkpoint, load_embeddings
from xmodal.index.device import GPU_MAX_K, gpu_count, set_search_param, to_search_device
from xmodal.index.store import IdMap, StoredIndex, index_checkpoint, load_index
from xmodal.index.vectors import modalities, query_vectors

QueryVectors = dict[str, tuple[np.ndarray, np.ndarray]]  # modality -> (vectors (Q, D), valid (Q,))

RESULT_SCHEMA = pa.schema(  # one line per (query, neighbour); every shard's frame is written with it
    [
        ("query_id", pa.string()),
        ("rank", pa.int64()),
        ("neighbour_id", pa.string()),
        ("score", pa.float32()),
        ("label", pa.string()),
        ("domain", pa.string()),
    ]
)


def search_index(stored: StoredIndex, use_gpu: bool | None = None) -> faiss.Index:
    """The index to search with: a sharded GPU copy when GPUs are there, with the recorded parameter."""
    index = to_search_device(stored.index, gpu_count(use_gpu))
    for name, value in stored.meta.get("search_param", {}).items():
        set_search_param(index, name, int(value))
    return index


def check_k(k: int) -> None:
    """Neighbours to list or vote with: at least one."""
    if k < 1:
        raise ConfigError(f"--k {k}: ask for at least 1 neighbour")


def search_rows(
    index: faiss.Index, queries: np.ndarray, width: int, valid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``width`` (similarity, row) per query; missing places (small index, or an approximate
    index that found fewer) are row -1 with similarity -inf. Only ``valid`` queries (default all)
    are searched; the others get no rows (a shard without a modality has vectors of width 0)."""
    width = max(1, min(width, index.ntotal))
    valid = np.ones(len(queries), bool) if valid is None else np.asarray(valid, bool)
    sims = np.full((len(queries), width), -np.inf, dtype=np.float32)
    rows = np.full((len(queries), width), -1, dtype=np.int64)
    if not valid.any():
        return sims, rows
    if queries.shape[1] != index.d:
        raise DataError(
            f"query embeddings are {queries.shape[1]} wide but the index (or gallery) holds {index.d}-wide "
            "vectors: they come from different models; embed both with the same checkpoint"
        )
    if width > GPU_MAX_K and faiss.get_num_gpus() > 0:
        raise ConfigError(
            f"{width} neighbours per query exceed the GPU search limit {GPU_MAX_K}; "
            "ask for fewer (--k) or search on the CPU (--no-gpu)"
        )
    s, r = index.search(np.ascontiguousarray(queries[valid], dtype=np.float32), width)
    sims[valid] = np.where(r < 0, -np.inf, s)
    rows[valid] = r
    return sims, rows


def top_particles(
    sims: np.ndarray, particles: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates (Q, M) of similarity and particle code (-1 = none) -> the ``k`` best distinct
    particles per query (codes (Q, k), -1 padded; scores (Q, k), -inf padded), best first; a
    query's ``exclude`` code (itself) is never listed."""
    s = np.where(particles < 0, -np.inf, sims).astype(np.float64)
    if exclude is not None:
        s = np.where(particles == np.asarray(exclude)[:, None], -np.inf, s)
    order = np.lexsort((-s, particles), axis=1)  # by particle, best score first within each
    p_sorted = np.take_along_axis(particles, order, axis=1)
    s_sorted = np.take_along_axis(s, order, axis=1)
    repeat = np.zeros_like(p_sorted, dtype=bool)
    repeat[:, 1:] = p_sorted[:, 1:] == p_sorted[:, :-1]
    s_sorted[repeat] = -np.inf
    best = np.argsort(-s_sorted, axis=1, kind="stable")[:, :k]
    top_s = np.take_along_axis(s_sorted, best, axis=1)
    top_p = np.where(np.isfinite(top_s), np.take_along_axis(p_sorted, best, axis=1), -1)
    if top_p.shape[1] < k:
        pad = k - top_p.shape[1]
        top_p = np.pad(top_p, ((0, 0), (0, pad)), constant_values=-1)
        top_s = np.pad(top_s, ((0, 0), (0, pad)), constant_values=-np.inf)
    return top_p, top_s


def neighbours(
    index: faiss.Index,
    ids: IdMap,
    kind: str,
    queries: QueryVectors,
    k: int,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` distinct neighbour particles of each query particle in an index of ``kind``:
    (first row of each particle in the id map (Q, k), -1 = none; score (Q, k))."""
    width = len(modalities(kind)) * (k + 1)
    all_s, all_p = [], []
    for vecs, valid in queries.values():
        s, r = search_rows(index, vecs, width, valid)
        all_s.append(s)
        all_p.append(np.where(r >= 0, ids.particle[np.maximum(r, 0)], -1))
    top_p, top_s = top_particles(np.concatenate(all_s, axis=1), np.concatenate(all_p, axis=1), k, exclude)
    return np.where(top_p >= 0, ids.first_row[np.maximum(top_p, 0)], -1), top_s


def result_frame(query_ids: np.ndarray, ids: IdMap, rows: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """Long format: one line per (query, neighbour), ranks from 1; missing neighbours dropped."""
    q, k = rows.shape
    keep = rows.reshape(-1) >= 0
    r = rows.reshape(-1)[keep]
    return pd.DataFrame(
        {  # the columns of RESULT_SCHEMA
            "query_id": np.repeat(np.asarray(query_ids, dtype=object), k)[keep],
            "rank": np.tile(np.arange(1, k + 1), q)[keep],
            "neighbour_id": ids.particle_id[r],
            "score": scores.reshape(-1)[keep].astype(np.float32),
            "label": ids.label[r],
            "domain": ids.domain[r],
        }
    )


def vectors_of(stored: StoredIndex, particle_ids: list[str]) -> tuple[QueryVectors, np.ndarray]:
    """Stored vectors of particles in the index, per modality, and their particle codes, one row
    per given id (an id given twice gets two rows)."""
    unique, position = np.unique(np.asarray(particle_ids, dtype=object).astype(str), return_inverse=True)
    found = pc.index_in(
        pa.array(stored.ids.particle_id.tolist(), pa.string()), value_set=pa.array(unique, pa.string())
    ).to_numpy(zero_copy_only=False)
    hit = ~np.isnan(found.astype(np.float64))
    missing = sorted(set(unique.tolist()) - set(stored.ids.particle_id[hit].tolist()))
    if missing:
        raise ConfigError(
            f"{len(missing)} particle id(s) not in the index {stored.path} (e.g. {missing[:3]}); "
            "`xmodal index info` shows what it holds"
        )
    rows = np.flatnonzero(hit)
    which = found[hit].astype(np.int64)  # position in unique
    codes = np.full(len(unique), -1, dtype=np.int64)
    codes[which] = stored.ids.particle[rows]
    out: QueryVectors = {}
    for m in modalities(stored.kind):
        sel = stored.ids.modality[rows] == m
        vecs = np.zeros((len(unique), stored.index.d), np.float32)
        valid = np.zeros(len(unique), bool)
        if sel.any():
            vecs[which[sel]] = stored.index.reconstruct_batch(rows[sel])
            valid[which[sel]] = True
        out[m] = (vecs[position], valid[position])
    return out, codes[position]


def search_ids(
    index_dir: str | Path, particle_ids: list[str], k: int = 10, use_gpu: bool | None = None
) -> pd.DataFrame:
    """Neighbours of particles stored in the index (each particle is left out of its own list)."""
    check_k(k)
    stored = load_index(index_dir)
    queries, codes = vectors_of(stored, list(particle_ids))
    rows, scores = neighbours(
        search_index(stored, use_gpu), stored.ids, stored.kind, queries, k, exclude=codes
    )
    return result_frame(np.asarray(particle_ids, dtype=object), stored.ids, rows, scores)


def search_embeddings(
    index_dir: str | Path,
    embeddings: str | Path,
    k: int = 10,
    query_kind: str | None = None,
    use_gpu: bool | None = None,
) -> Iterator[pd.DataFrame]:
    """Neighbours of new particles, one frame per embeddings shard (archives are streamed). The
    checks (among them: the particles were embedded by the index's checkpoint) run at the call,
    before the first frame is asked for."""
    check_k(k)
    stored = load_index(index_dir)
    check_same_checkpoint(
        index_dir, index_checkpoint(stored.meta), embeddings, embeddings_checkpoint(embeddings)
    )
    return _embedding_frames(stored, search_index(stored, use_gpu), embeddings, k, query_kind)


def _embedding_frames(
    stored: StoredIndex, index: faiss.Index, embeddings: str | Path, k: int, query_kind: str | None
) -> Iterator[pd.DataFrame]:
    for f in parquet_files(embeddings):
        es = load_embeddings(f)
        queries = query_vectors(es, query_kind or stored.kind, where=str(f))
        rows, scores = neighbours(index, stored.ids, stored.kind, queries, k)
        yield result_frame(es.particle_id, stored.ids, rows, scores)


def check_out(out: str | Path | None) -> None:
    if out and Path(out).suffix not in (".csv", ".parquet"):
        raise ConfigError(f"--out {out}: name a .csv or .parquet file")


def write_results(frames: Iterable[pd.DataFrame], out: str | Path | None, show: int = 20) -> int:
    """Stream result frames into ``out`` (``.csv`` or ``.parquet``, typed by ``RESULT_SCHEMA``), or
    print the first ``show`` lines when there is no ``out``; returns the number of result lines."""
    check_out(out)
    path = Path(out) if out else None
    rows, writer = 0, None
    for frame in frames:
        if path is None:
            if rows < show:
                print(frame.head(show - rows).to_string(index=False, header=rows == 0))
        elif path.suffix == ".csv":
            frame.to_csv(path, mode="a" if rows else "w", header=rows == 0, index=False)
        else:
            writer = writer or pq.ParquetWriter(path, RESULT_SCHEMA, compression="zstd")
            writer.write_table(pa.Table.from_pandas(frame, schema=RESULT_SCHEMA, preserve_index=False))
        rows += len(frame)
    if writer is not None:
        writer.close()
    return rows
