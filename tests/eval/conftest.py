"""Shared helpers for the evaluation tests, handed to tests as the ``ev`` fixture (tests run with
``--import-mode=importlib``, so a helper module could not be imported): synthetic embedding sets
and an independent, loop-based implementation of the paper's k-NN rule to compare against.
FAISS runs on one thread in these tests (the machine is shared); the setting is restored after."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from xmodal.eval.embeddings import EmbeddingSet
from xmodal.eval.knn import EXACT_DISTANCE, TIE_RTOL


def make_set(
    n: int,
    n_classes: int,
    dim: int = 16,
    noise: float = 1.0,
    seed: int = 0,
    domain: str = "LAB",
    profile: bool = True,
    unlabelled: int = 0,
) -> EmbeddingSet:
    """Class centres shared across seeds (so two sets are in one space), image and profile near them."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).normal(size=(n_classes, dim))
    y = rng.integers(0, n_classes, n)
    labels = np.array([f"class{c:02d}" for c in y], dtype=object)
    labels[:unlabelled] = None
    image = centres[y] + noise * rng.normal(size=(n, dim))
    prof = centres[y] + noise * rng.normal(size=(n, dim)) if profile else None
    return EmbeddingSet(
        particle_id=np.array([f"{domain}:{i}" for i in range(n)], dtype=object),
        label=labels,
        domain=np.full(n, domain, dtype=object),
        image_emb=image,
        image_valid=np.ones(n, bool),
        profile_emb=prof,
        profile_valid=np.ones(n, bool) if profile else np.zeros(n, bool),
    )


def python_vote(neighbours: list[tuple[float, int]], n_classes: int) -> int:
    """The paper's vote for one query written plainly: (distance, class code) pairs."""
    exact = [c for d, c in neighbours if d <= EXACT_DISTANCE]
    totals = [0.0] * n_classes
    if exact:
        for c in exact:
            totals[c] += 1.0
    else:
        for d, c in neighbours:
            totals[c] += 1.0 / d
    best = max(totals)
    return min(c for c in range(n_classes) if totals[c] >= best * (1 - TIE_RTOL))


def entries(gallery: dict[str, np.ndarray], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gallery entries in the documented order (all image rows, then all profile rows)."""
    return np.concatenate([gallery[m] for m in gallery]).astype(np.float64), np.tile(labels, len(gallery))


def numpy_distances(entries: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """(Q, E) cosine distances, normalising here in float64."""
    gn = entries / np.sqrt((entries**2).sum(axis=1, keepdims=True))
    qn = queries / np.sqrt((queries**2).sum(axis=1, keepdims=True))
    return np.maximum(1.0 - qn @ gn.T, 0.0)


def sklearn_distances(entries: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """(Q, E) distances from scikit-learn's NearestNeighbors(metric="cosine"), all neighbours asked
    for, so that its arbitrary order among equal distances cannot hide an entry."""
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(metric="cosine", algorithm="brute").fit(entries)
    dist, idx = nn.kneighbors(queries.astype(np.float64), n_neighbors=len(entries))
    out = np.empty_like(dist)
    np.put_along_axis(out, idx, dist, axis=1)
    return out


def reference_predict(
    distances: list[np.ndarray], entry_labels: np.ndarray, k: int, n_classes: int
) -> np.ndarray:
    """One (Q, E) distance matrix per query modality: per query, the k entries with the smallest
    (distance, index) from each, pooled, then ``python_vote``."""
    kk = min(k, distances[0].shape[1])
    out = np.empty(len(distances[0]), dtype=np.int64)
    for i in range(len(out)):
        pooled: list[tuple[float, int]] = []
        for d in distances:
            nearest = sorted(range(d.shape[1]), key=lambda j: (d[i, j], j))[:kk]
            pooled += [(float(d[i, j]), int(entry_labels[j])) for j in nearest]
        out[i] = python_vote(pooled, n_classes)
    return out


@pytest.fixture
def ev() -> SimpleNamespace:
    return SimpleNamespace(
        make_set=make_set,
        python_vote=python_vote,
        entries=entries,
        numpy_distances=numpy_distances,
        sklearn_distances=sklearn_distances,
        reference_predict=reference_predict,
    )


@pytest.fixture(autouse=True)
def _one_faiss_thread(faiss_one_thread) -> None:
    """Every test here runs FAISS single-threaded (root conftest)."""
