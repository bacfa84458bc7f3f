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

Predictions are those of exact float64 arithmetic. FAISS searches float32 copies (fast) for a
shortlist a few entries longer than k. A query whose float32 neighbour set or vote could differ from
the float64 one within a proven rounding bound (``similarity_tolerance``) is re-ranked in float64:
over its shortlist when that provably holds every contender, else by brute force (``exact_search``).
On random embeddings that is about 1% of queries; on tied data it is the tied queries.
"""

from __future__ import annotations

from collections.abc import Mapping

import faiss
import numpy as np

EXACT_DISTANCE = 1e-9
TIE_RTOL = 1e-9
GPU_SIM_TOLERANCE = 2e-3  # cuBLAS may run float32 GEMMs as TF32 (10-bit mantissa)
_QUERY_CHUNK = 4096  # rows per float64 brute-force block (bounds memory at chunk x gallery)
SHORTLIST_EXTRA = 8

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
    """Bound on |float32 FAISS similarity - float64 similarity| for unit vectors of width ``dim``
    (u = 2^-24): rounding the inputs (2u) plus summing ``dim`` products in any order ((dim - 1)u),
    each relative to sum |x_i y_i| <= 1, plus one u of slack."""
    bound = (dim + 2) * 2.0**-24
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


def shortlist_width(k: int, gallery_size: int) -> int:
    """Columns a FAISS shortlist needs for ``knn_predict`` with this k: one past k shows whether
    the k-th place is contested; ``SHORTLIST_EXTRA`` more usually hold the whole contested group,
    so that it can be re-ranked in float64 without a brute-force pass."""
    return min(k + 1 + SHORTLIST_EXTRA, gallery_size)


def top_of_union(
    parts: list[Shortlist], offsets: list[int], k: int
) -> tuple[Shortlist, np.ndarray, np.ndarray, np.ndarray]:
    """Shortlists over disjoint galleries (part j's indices shifted by ``offsets[j]``), each sorted
    by similarity, joined: returns (all listed (sims, idx) unsorted, the k most similar entries'
    columns (Q, k) in any order, the k-th and (k+1)-th largest similarity (-inf if absent))."""
    sims = np.concatenate([p[0] for p in parts], axis=1).astype(np.float64)
    idx = np.concatenate([p[1] + off for p, off in zip(parts, offsets)], axis=1)
    width = sims.shape[1]
    if len(parts) == 1:  # FAISS returns a part sorted: no selection needed
        order = np.broadcast_to(np.arange(min(k + 1, width)), (len(sims), min(k + 1, width)))
    else:  # only the k-th and (k+1)-th places matter; the order inside the top k does not
        order = np.argpartition(-sims, [k - 1, k] if width > k else [k - 1], axis=1)
    kth = sims[np.arange(len(sims)), order[:, k - 1]]
    after = sims[np.arange(len(sims)), order[:, k]] if width > k else np.full(len(sims), -np.inf)
    return (sims, idx), order[:, :k], kth, after


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
    ``shortlists``: optional ``faiss_search`` results per (gallery modality, query modality) for
    exactly the predicted rows, with at least ``shortlist_width(k, G)`` columns (lets a caller share
    one search between combinations). Missing ones are searched here.
    """
    gmods, qmods = list(gallery), list(queries)
    g = len(gallery_labels)
    if g == 0:
        raise ValueError("knn_predict: the gallery is empty")
    k_eff = min(k, g * len(gmods))
    width = shortlist_width(k_eff, g)
    labels_all = np.tile(np.asarray(gallery_labels, dtype=np.int64), len(gmods))
    rows = np.arange(len(next(iter(queries.values())))) if query_rows is None else np.asarray(query_rows)
    tol = similarity_tolerance(next(iter(gallery.values())).shape[1])
    flagged = np.zeros(len(rows), dtype=bool)  # float32 may have decided differently from float64
    contained = np.ones(len(rows), dtype=bool)  # every entry that could be in the top k is listed
    lists, top_sims, top_idx = [], [], []
    for qm in qmods:
        parts = []
        for gm in gmods:
            found = (shortlists or {}).get((gm, qm))
            if found is None:
                found = faiss_search(
                    gallery[gm].astype(np.float32), queries[qm][rows].astype(np.float32), width
                )
            parts.append((found[0][:, :width], found[1][:, :width]))
        (sims, idx), top, kth, after = top_of_union(parts, [j * g for j in range(len(gmods))], k_eff)
        flagged |= kth - after <= 2 * tol
        if width < g:  # unlisted entries are at most as similar (float32) as each part's last one
            unlisted = np.max([p[0][:, -1] for p in parts], axis=0).astype(np.float64)
            contained &= kth - unlisted > 2 * tol
        lists.append(idx)
        top_sims.append(np.take_along_axis(sims, top, axis=1))
        top_idx.append(np.take_along_axis(idx, top, axis=1))
    distances = np.maximum(1.0 - np.concatenate(top_sims, axis=1), 0.0)
    neighbour_labels = labels_all[np.concatenate(top_idx, axis=1)]
    pred, votes = vote(neighbour_labels, distances, n_classes)
    flagged |= _uncertain(distances, votes, pred, tol)
    rerank = flagged & contained
    if rerank.any():
        gallery_all = np.concatenate([gallery[m] for m in gmods], axis=0)
        found = [
            _rerank(gallery_all, queries[qm][rows[rerank]], idx[rerank], k_eff)
            for qm, idx in zip(qmods, lists)
        ]
        dist64 = np.maximum(1.0 - np.concatenate([s for s, _ in found], axis=1), 0.0)
        pred[rerank] = vote(labels_all[np.concatenate([i for _, i in found], axis=1)], dist64, n_classes)[0]
    brute = flagged & ~contained
    if brute.any():
        pred[brute] = exact_predict(
            gallery, gallery_labels, {m: v[rows[brute]] for m, v in queries.items()}, k, n_classes
        )
    return pred


def _rerank(gallery64: np.ndarray, queries64: np.ndarray, idx: np.ndarray, k: int) -> Shortlist:
    """Float64 similarities of the listed entries ``idx`` (Q, W), top ``k`` by (similarity, lower
    index first)."""
    exact = np.empty(idx.shape)
    for j in range(idx.shape[1]):
        exact[:, j] = np.einsum("qd,qd->q", queries64, gallery64[idx[:, j]])
    order = np.lexsort((idx, -exact), axis=1)[:, :k]
    return np.take_along_axis(exact, order, axis=1), np.take_along_axis(idx, order, axis=1)


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
