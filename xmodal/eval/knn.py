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
shortlist a few entries longer than k. A query whose float32 neighbour set could differ from the
float64 one within a proven rounding bound (``similarity_tolerance``) is re-ranked in float64: over
its shortlist when that provably holds every contender, else by brute force (``exact_search``). A
query whose vote could swing within the bound is voted again over float64 similarities. On random
embeddings that is under 1% of queries; on tied data it is the tied queries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import faiss
import numpy as np

EXACT_DISTANCE = 1e-9
TIE_RTOL = 1e-9
GPU_SIM_TOLERANCE = 2e-3  # cuBLAS may run float32 GEMMs as TF32 (10-bit mantissa)
_QUERY_CHUNK = 4096  # rows per float64 brute-force block (bounds memory at chunk x gallery)
# Shortlist columns past k+1. On CPU each costs FAISS heap work (bench_knn: 2 extra were 12% faster
# than 8 and sent no row to brute force; 0 sent 0.5% of rows there, slower overall). On a GPU the
# columns are nearly free and the TF32 tolerance contests longer groups.
SHORTLIST_EXTRA = 2
SHORTLIST_EXTRA_GPU = 8

Shortlist = tuple[np.ndarray, np.ndarray]  # (similarities (Q, m) descending, gallery indices (Q, m))


def l2_normalize(x: np.ndarray, what: str = "embeddings") -> np.ndarray:
    """Rows scaled to unit length, float64. A zero row has no direction, so it is an error."""
    x64 = np.array(x, dtype=np.float64)  # a copy, scaled in place below
    norms = np.sqrt(np.einsum("ij,ij->i", x64, x64))[:, None]
    zero = norms[:, 0] == 0
    if zero.any():
        raise ValueError(
            f"{what}: {int(zero.sum())} rows have zero norm (first at row {int(np.argmax(zero))}); "
            "cosine similarity is undefined for them - mark them invalid instead"
        )
    x64 /= norms
    return x64


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
    the k-th place is contested; a few more usually hold the whole contested group,
    so that it can be re-ranked in float64 without a brute-force pass."""
    return min(k + 1 + (SHORTLIST_EXTRA_GPU if use_gpu() else SHORTLIST_EXTRA), gallery_size)


def join_gallery(
    gallery: Mapping[str, np.ndarray], gallery_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """A gallery's entries in the documented order (all image rows, then all profile rows), their
    class codes, and the rounding tolerance for their width."""
    entries = np.concatenate(list(gallery.values()), axis=0)
    labels = np.tile(np.asarray(gallery_labels, dtype=np.int64), len(gallery))
    return entries, labels, similarity_tolerance(entries.shape[1])


@dataclass
class Nearest:
    """The k nearest entries of a gallery (one modality, or both joined) for queries of one
    modality. The set is the float64 one: rows where float32 FAISS could have ranked otherwise
    were re-ranked in float64 (``exact``); for the others only the similarities are float32."""

    sims: np.ndarray  # (Q, k) similarities as float64, in any order
    idx: np.ndarray  # (Q, k) entries of the joined gallery
    exact: np.ndarray  # (Q,) sims are float64 values (else float32 ones)

    def take(self, pos: np.ndarray) -> Nearest:
        """The same for a subset of the queries (positions into this one)."""
        return Nearest(self.sims[pos], self.idx[pos], self.exact[pos])


def nearest(
    parts: list[Shortlist], gallery_all: np.ndarray, queries: np.ndarray, rows: np.ndarray, k: int, tol: float
) -> Nearest:
    """Top ``k`` of a joined gallery ``gallery_all`` (float64; part j of ``parts`` lists entries
    j * G ... of it) for the query rows ``rows`` of ``queries`` (float64), from FAISS shortlists
    sorted by similarity, one per part, row i for query rows[i]. ``k`` beyond the gallery means all
    of it."""
    k = min(k, len(gallery_all))
    g = len(gallery_all) // len(parts)
    offsets = [j * g for j in range(len(parts))]
    # The union's k+1 most similar entries are among the first k+1 of each sorted part.
    heads = [(p[0][:, : k + 1], p[1][:, : k + 1] + off) for p, off in zip(parts, offsets)]
    sims = np.concatenate([h[0] for h in heads], axis=1).astype(np.float64)
    idx = np.concatenate([h[1] for h in heads], axis=1)
    if len(parts) > 1:  # only the k-th and (k+1)-th places matter; the order inside the top k does not
        order = np.argpartition(-sims, [k - 1, k] if sims.shape[1] > k else [k - 1], axis=1)
        sims, idx = np.take_along_axis(sims, order, axis=1), np.take_along_axis(idx, order, axis=1)
    kth = sims[:, k - 1]
    exact = np.zeros(len(sims), dtype=bool)
    if sims.shape[1] <= k:  # the whole gallery is listed: the set is certain
        return Nearest(sims[:, :k], idx[:, :k], exact)
    doubtful = np.flatnonzero(kth - sims[:, k] <= 2 * tol)
    sims, idx = sims[:, :k], idx[:, :k]
    if len(doubtful):
        contained = np.ones(len(doubtful), dtype=bool)
        short = [p[0][doubtful, -1] for p in parts if p[0].shape[1] < g]
        if short:  # unlisted entries are at most as similar (float32) as their part's last listed one
            contained = kth[doubtful] - np.max(short, axis=0).astype(np.float64) > 2 * tol
        listed = doubtful[contained]
        if len(listed):  # re-rank the listed entries in float64
            every = np.concatenate([p[1][listed] + off for p, off in zip(parts, offsets)], axis=1)
            sims[listed], idx[listed] = _rerank(gallery_all, queries[rows[listed]], every, k)
        brute = doubtful[~contained]
        if len(brute):  # the contested group runs past the shortlist
            sims[brute], idx[brute] = exact_search(gallery_all, queries[rows[brute]], k)
        exact[doubtful] = True
    return Nearest(sims, idx, exact)


def vote(labels: np.ndarray, distances: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The paper's weighted vote. ``labels`` (Q, M) class codes of the neighbours, ``distances``
    (Q, M). Returns (predicted code (Q,), vote totals (Q, n_classes))."""
    votes = _tally(labels, distances, n_classes)
    return _winner(votes)[0], votes


def _tally(labels: np.ndarray, distances: np.ndarray, n_classes: int) -> np.ndarray:
    """Vote totals (Q, n_classes): weight 1 / distance, or only the exact matches, one vote each."""
    q = len(labels)
    exact = distances <= EXACT_DISTANCE
    with np.errstate(divide="ignore"):
        weights = 1.0 / distances
    if exact.any():
        weights = np.where(exact.any(axis=1, keepdims=True), exact.astype(np.float64), weights)
    flat = (labels + (np.arange(q) * n_classes)[:, None]).ravel()
    return np.bincount(flat, weights=weights.ravel(), minlength=q * n_classes).reshape(q, n_classes)


def _winner(votes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(winning class code, largest total, largest minus second-largest total) per row. Totals
    within ``TIE_RTOL`` of the largest tie; the smallest tied code wins."""
    rows = np.arange(len(votes))
    best = votes.argmax(axis=1)
    top = votes[rows, best]
    if votes.shape[1] == 1:
        return best, top, top
    votes[rows, best] = -np.inf  # (restored below) so that max() gives the runner-up
    second = votes.max(axis=1)
    votes[rows, best] = top
    tied = np.flatnonzero(second >= top * (1.0 - TIE_RTOL))
    if len(tied):  # argmax took the first exact maximum; near-equal totals tie too
        best[tied] = np.argmax(votes[tied] >= top[tied, None] * (1.0 - TIE_RTOL), axis=1)
    return best, top, top - second


def _uncertain(distances: np.ndarray, top: np.ndarray, margin: np.ndarray, tol: float) -> np.ndarray:
    """Rows whose float32-based vote might differ from the float64 one: near-exact matches, or a
    winning margin within the propagated rounding bound of the inverse-distance weights (a tie
    has margin <= TIE_RTOL * top, so it is always re-decided)."""
    near_exact = (distances <= EXACT_DISTANCE + 4 * tol).any(axis=1)
    d = np.maximum(distances, 4 * tol)
    weight_err = (tol / (d * (d - tol))).sum(axis=1)
    return near_exact | (margin <= 2 * weight_err + 2 * TIE_RTOL * top)


def decide(
    near: list[Nearest],
    gallery_all: np.ndarray,
    labels_all: np.ndarray,
    queries: Mapping[str, np.ndarray],
    rows: np.ndarray,
    n_classes: int,
    tol: float,
) -> np.ndarray:
    """The vote over the neighbours ``near`` (one per query modality, in ``queries`` order) of the
    query rows ``rows``, in entries of the joined gallery ``gallery_all`` labelled ``labels_all``.
    Where float32 similarities could swing the vote, it is taken again over float64 ones."""
    if len(near) == 1:
        sims, idx, exact = near[0].sims, near[0].idx, near[0].exact
    else:
        sims = np.concatenate([nb.sims for nb in near], axis=1)
        idx = np.concatenate([nb.idx for nb in near], axis=1)
        exact = np.logical_and.reduce([nb.exact for nb in near])
    labels = labels_all[idx]
    pred = labels[:, 0].copy()
    # Neighbours all of one class elect it under any weights: only split rows are counted.
    split = np.flatnonzero((labels[:, 1:] != labels[:, :1]).any(axis=1))
    if len(split) == 0:
        return pred
    distances = np.maximum(1.0 - sims[split], 0.0)
    pred[split], top, margin = _winner(_tally(labels[split], distances, n_classes))
    again = split[_uncertain(distances, top, margin, tol) & ~exact[split]]
    if len(again):
        sims64 = np.concatenate(
            [
                np.where(
                    nb.exact[again, None],
                    nb.sims[again],
                    _dots(gallery_all, queries[qm][rows[again]], nb.idx[again]),
                )
                for qm, nb in zip(queries, near)
            ],
            axis=1,
        )
        pred[again] = vote(labels[again], np.maximum(1.0 - sims64, 0.0), n_classes)[0]
    return pred


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
    g = len(gallery_labels)
    if g == 0:
        raise ValueError("knn_predict: the gallery is empty")
    width = shortlist_width(k, g)
    rows = np.arange(len(next(iter(queries.values())))) if query_rows is None else np.asarray(query_rows)
    gallery_all, labels_all, tol = join_gallery(gallery, gallery_labels)
    near = []
    for qm in queries:
        parts = []
        for gm in gallery:
            found = (shortlists or {}).get((gm, qm))
            if found is None:
                found = faiss_search(
                    gallery[gm].astype(np.float32), queries[qm][rows].astype(np.float32), width
                )
            parts.append(found)
        near.append(nearest(parts, gallery_all, queries[qm], rows, k, tol))
    return decide(near, gallery_all, labels_all, queries, rows, n_classes, tol)


def _dots(gallery64: np.ndarray, queries64: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Float64 similarities (Q, W) of query i with gallery entries ``idx[i]``. Row-wise dot
    products column by column: no BLAS call (its spinning threads would slow the FAISS searches
    that follow on a small machine) and no (Q, W, D) gather."""
    out = np.empty(idx.shape)
    for j in range(idx.shape[1]):
        out[:, j] = np.einsum("qd,qd->q", queries64, gallery64[idx[:, j]])
    return out


def _rerank(gallery64: np.ndarray, queries64: np.ndarray, idx: np.ndarray, k: int) -> Shortlist:
    """Float64 similarities of the listed entries ``idx`` (Q, W), top ``k`` by (similarity, lower
    index first)."""
    exact = _dots(gallery64, queries64, idx)
    order = np.lexsort((idx, -exact), axis=1)[:, :k]
    return np.take_along_axis(exact, order, axis=1), np.take_along_axis(idx, order, axis=1)


def exact_predict(
    gallery: Mapping[str, np.ndarray],
    gallery_labels: np.ndarray,
    queries: Mapping[str, np.ndarray],
    k: int,
    n_classes: int,
) -> np.ndarray:
    """The same prediction as ``knn_predict`` by float64 brute force only (no FAISS), except where
    distinct gallery vectors tie exactly: BLAS's matrix product here and the einsum of ``_rerank``
    may round such a tie differently (e.g. -5.8e-18 against 0 for an orthogonal pair)."""
    gallery_all, labels_all, _ = join_gallery(gallery, gallery_labels)
    found = [exact_search(gallery_all, q, k) for q in queries.values()]
    distances = np.maximum(1.0 - np.concatenate([s for s, _ in found], axis=1), 0.0)
    return vote(labels_all[np.concatenate([i for _, i in found], axis=1)], distances, n_classes)[0]
