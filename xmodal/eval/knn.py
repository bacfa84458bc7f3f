"""Cosine k-NN with the paper's vote, searched through FAISS (exact inner product).

The rule (Kareinen et al. 2026, authors' ``src/benchmark.py``), for embeddings L2-normalised here:

* distance = 1 - cosine similarity; the k nearest gallery entries vote with weight 1 / distance;
* an exact match (distance <= ``EXACT_DISTANCE``) takes the vote: when a query's neighbours include
  exact matches, only those vote, one vote each;
* query I+P pools the k neighbours of the image query and the k of the profile query (2k votes);
  gallery I+P holds both embeddings of every gallery particle (image rows first, then profile rows);
* k larger than the gallery means the whole gallery.

Ties, deterministic (the authors leave the first to ``argpartition`` and the second to label order):

* equal distances at the k-th place: the gallery entry with the lower index is nearer (for gallery
  I+P, image rows come before profile rows);
* equal vote totals (within a relative ``TIE_RTOL``): the class with the smallest class code wins;
  callers encode classes in sorted name order, so that is the alphabetically first class.

Predictions are those of exact float64 arithmetic. FAISS searches float32 copies (fast); a query whose
float32 neighbour set or vote could differ from the float64 one within a proven rounding bound is
re-done in float64 by brute force (``exact_search``). On random embeddings that is well under 1% of
queries; on tied data it is the tied queries.
"""

from __future__ import annotations

from collections.abc import Mapping

import faiss
import numpy as np

EXACT_DISTANCE = 1e-9
TIE_RTOL = 1e-9
GPU_SIM_TOLERANCE = 2e-3  # cuBLAS may run float32 GEMMs as TF32 (10-bit mantissa)
_QUERY_CHUNK = 4096  # rows per float64 brute-force block (bounds memory at chunk x gallery)

Shortlist = tuple[np.ndarray, np.ndarray]  # (similarities (Q, m) descending, gallery indices (Q, m))


def l2_normalize(x: np.ndarray, what: str = "embeddings") -> np.ndarray:
    """Rows scaled to unit length, float64. A zero row has no direction, so it is an error."""
    x64 = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x64, axis=1, keepdims=True)
    zero = norms[:, 0] == 0
    if zero.any():
        raise ValueError(
            f"{what}: {int(zero.sum())} rows have zero norm (first at row {int(np.argmax(zero))}); "
            "cosine similarity is undefined for them - mark them invalid instead"
        )
    return x64 / norms


def use_gpu() -> bool:
    return faiss.get_num_gpus() > 0


def similarity_tolerance(dim: int) -> float:
    """Bound on |float32 FAISS similarity - float64 similarity| for unit vectors of width ``dim``:
    rounding the inputs (2u) plus accumulating ``dim`` products ((dim - 1)u), doubled for slack."""
    bound = 2.0 * (dim + 2) * 2.0**-24
    return max(bound, GPU_SIM_TOLERANCE) if use_gpu() else bound


def faiss_search(gallery32: np.ndarray, queries32: np.ndarray, k: int) -> Shortlist:
    """Top-``k`` (k <= gallery size) inner products through ``IndexFlatIP``; float32 in and out."""
    g = np.ascontiguousarray(gallery32, dtype=np.float32)
    q = np.ascontiguousarray(queries32, dtype=np.float32)
    if not 0 < k <= len(g):
        raise ValueError(f"faiss_search: k={k} must be in 1..{len(g)} (the gallery size)")
    if g.shape[1] != q.shape[1]:
        raise ValueError(f"faiss_search: gallery width {g.shape[1]} != query width {q.shape[1]}")
    index = faiss.IndexFlatIP(g.shape[1])
    index.add(g)
    if use_gpu() and k <= 1024:  # GPU flat search supports k up to 2048; beyond that stay on CPU
        index = faiss.index_cpu_to_all_gpus(index)
    sims, idx = index.search(q, k)
    return sims, idx


def exact_search(gallery64: np.ndarray, queries64: np.ndarray, k: int) -> Shortlist:
    """Float64 brute force: top-``k`` similarities, equal ones in gallery order (the tie rule)."""
    k = min(k, len(gallery64))
    sims = np.empty((len(queries64), k))
    idx = np.empty((len(queries64), k), dtype=np.int64)
    for s in range(0, len(queries64), _QUERY_CHUNK):
        block = queries64[s : s + _QUERY_CHUNK] @ gallery64.T
        order = np.argsort(-block, axis=1, kind="stable")[:, :k]
        idx[s : s + _QUERY_CHUNK] = order
        sims[s : s + _QUERY_CHUNK] = np.take_along_axis(block, order, axis=1)
    return sims, idx


def merge_shortlists(parts: list[Shortlist], offsets: list[int], k: int) -> Shortlist:
    """Top-``k`` of the union of shortlists over disjoint galleries (part j's indices shifted by
    ``offsets[j]``); equal similarities in combined-index order."""
    if len(parts) == 1 and offsets[0] == 0:
        return parts[0][0][:, :k].astype(np.float64), parts[0][1][:, :k]
    sims = np.concatenate([p[0] for p in parts], axis=1).astype(np.float64)
    idx = np.concatenate([p[1] + off for p, off in zip(parts, offsets)], axis=1)
    order = np.lexsort((idx, -sims), axis=1)[:, :k]
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(idx, order, axis=1)


def vote(labels: np.ndarray, distances: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The paper's weighted vote. ``labels`` (Q, M) class codes of the neighbours, ``distances``
    (Q, M). Returns (predicted code (Q,), vote totals (Q, n_classes))."""
    q, m = labels.shape
    exact = distances <= EXACT_DISTANCE
    has_exact = exact.any(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        weights = np.where(has_exact, exact.astype(np.float64), 1.0 / distances)
    flat = (np.arange(q)[:, None] * n_classes + labels).ravel()
    votes = np.bincount(flat, weights=weights.ravel(), minlength=q * n_classes).reshape(q, n_classes)
    top = votes.max(axis=1, keepdims=True)
    pred = np.argmax(votes >= top * (1.0 - TIE_RTOL), axis=1)  # first of the tied = smallest code
    return pred, votes


def _uncertain(distances: np.ndarray, votes: np.ndarray, pred: np.ndarray, tol: float) -> np.ndarray:
    """Rows whose float32-based vote might differ from the float64 one: near-exact matches, or a
    winning margin within the propagated rounding bound of the inverse-distance weights."""
    near_exact = (distances <= EXACT_DISTANCE + 4 * tol).any(axis=1)
    d = np.maximum(distances, 4 * tol)
    weight_err = (tol / (d * (d - tol))).sum(axis=1)
    rows = np.arange(len(pred))
    top = votes[rows, pred]
    others = votes.copy()
    others[rows, pred] = 0.0
    margin = top - others.max(axis=1)
    return near_exact | (margin <= 2 * weight_err + 2 * TIE_RTOL * top)


def knn_predict(
    gallery: Mapping[str, np.ndarray],
    gallery_labels: np.ndarray,
    queries: Mapping[str, np.ndarray],
    k: int,
    n_classes: int,
    shortlists: Mapping[tuple[str, str], Shortlist] | None = None,
    query_rows: np.ndarray | None = None,
) -> np.ndarray:
    """Predict class codes for queries.

    ``gallery``: modality -> (G, D) unit rows (float64) of the same G particles, labelled by
    ``gallery_labels`` (G,) codes in 0..n_classes-1; two modalities = gallery I+P.
    ``queries``: modality -> (N, D) unit rows (float64) of the same N particles; two = query I+P.
    ``query_rows``: the rows of ``queries`` to predict (default all), so that callers need not copy
    a large query matrix per cell.
    ``shortlists``: optional precomputed ``faiss_search`` results per (gallery modality, query
    modality) for exactly the predicted rows, with at least min(k + 1, G) columns (lets a caller
    share one search between combinations). Missing ones are searched here.
    """
    gmods, qmods = list(gallery), list(queries)
    g = len(gallery_labels)
    if g == 0:
        raise ValueError("knn_predict: the gallery is empty")
    k_eff = min(k, g * len(gmods))
    width = min(k_eff + 1, g)  # one past k shows whether the k-th place is contested
    labels_all = np.tile(np.asarray(gallery_labels, dtype=np.int64), len(gmods))
    rows = np.arange(len(next(iter(queries.values())))) if query_rows is None else np.asarray(query_rows)
    n_queries = len(rows)
    tol = similarity_tolerance(next(iter(gallery.values())).shape[1])
    flagged = np.zeros(n_queries, dtype=bool)
    pooled_sims, pooled_idx = [], []
    for qm in qmods:
        parts = []
        for gm in gmods:
            found = (shortlists or {}).get((gm, qm))
            if found is None:
                found = faiss_search(
                    gallery[gm].astype(np.float32), queries[qm][rows].astype(np.float32), width
                )
            parts.append((found[0][:, :width], found[1][:, :width]))
        sims, idx = merge_shortlists(parts, [j * g for j in range(len(gmods))], k_eff + 1)
        if sims.shape[1] > k_eff:
            flagged |= sims[:, k_eff - 1] - sims[:, k_eff] <= 2 * tol
        pooled_sims.append(sims[:, :k_eff])
        pooled_idx.append(idx[:, :k_eff])
    distances = np.maximum(1.0 - np.concatenate(pooled_sims, axis=1), 0.0)
    neighbour_labels = labels_all[np.concatenate(pooled_idx, axis=1)]
    pred, votes = vote(neighbour_labels, distances, n_classes)
    flagged |= _uncertain(distances, votes, pred, tol)
    if flagged.any():
        pred[flagged] = exact_predict(
            gallery, gallery_labels, {m: v[rows[flagged]] for m, v in queries.items()}, k, n_classes
        )
    return pred


def exact_predict(
    gallery: Mapping[str, np.ndarray],
    gallery_labels: np.ndarray,
    queries: Mapping[str, np.ndarray],
    k: int,
    n_classes: int,
) -> np.ndarray:
    """The same prediction as ``knn_predict`` by float64 brute force only (no FAISS)."""
    gallery_all = np.concatenate([gallery[m] for m in gallery], axis=0)
    labels_all = np.tile(np.asarray(gallery_labels, dtype=np.int64), len(gallery))
    found = [exact_search(gallery_all, q, k) for q in queries.values()]
    distances = np.maximum(1.0 - np.concatenate([s for s, _ in found], axis=1), 0.0)
    return vote(labels_all[np.concatenate([i for _, i in found], axis=1)], distances, n_classes)[0]
