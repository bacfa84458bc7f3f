"""Helpers for the index tests, handed out as the ``ix`` fixture (tests import with
``--import-mode=importlib``, so a helper module could not be imported): clustered embedding sets
like a trained model's (classes are tight clouds around their centres) and an independent
brute-force neighbour search. FAISS runs on one thread here (the machine is shared)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from xmodal.eval.embeddings import EmbeddingSet, write_embeddings


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def centres(n: int, dim: int, seed: int) -> np.ndarray:
    return unit(np.random.default_rng(seed).normal(size=(n, dim)))


def clustered_set(
    centre: np.ndarray,
    labels: list[str | None],
    per_class: int,
    noise: float,
    seed: int,
    prefix: str,
    domain: str = "LAB",
    missing_image: int = 0,
) -> EmbeddingSet:
    """``per_class`` particles around each row of ``centre``; image and profile embeddings are two
    independent draws near the same centre (as a CLIP model aligns the two modalities)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(centre)), per_class)
    n, dim = len(y), centre.shape[1]
    image = unit(centre[y] + noise * rng.normal(size=(n, dim)) / np.sqrt(dim))
    profile = unit(centre[y] + noise * rng.normal(size=(n, dim)) / np.sqrt(dim))
    image_valid = np.ones(n, bool)
    image_valid[rng.choice(n, missing_image, replace=False)] = False
    return EmbeddingSet(
        particle_id=np.array([f"{prefix}{i}" for i in range(n)], dtype=object),
        label=np.array([labels[c] for c in y], dtype=object),
        domain=np.full(n, domain, dtype=object),
        image_emb=np.where(image_valid[:, None], image, 0),
        image_valid=image_valid,
        profile_emb=profile,
        profile_valid=np.ones(n, bool),
    )


def image_only(es: EmbeddingSet) -> EmbeddingSet:
    """The same particles as an image-only model (the DINO baseline) writes them: no profile column
    at all (width 0 in memory)."""
    n = len(es)
    return EmbeddingSet(
        es.particle_id, es.label, es.domain, es.image_emb, es.image_valid, np.zeros((n, 0)), np.zeros(n, bool)
    )


def write_shards(es: EmbeddingSet, out: Path, shards: int) -> Path:
    for part in np.array_split(np.arange(len(es)), shards):
        write_embeddings(es.subset(part), out)
    return out


def brute_neighbours(
    rows: np.ndarray,
    row_particle: np.ndarray,
    queries: list[np.ndarray],
    valid: list[np.ndarray],
    k: int,
    exclude: np.ndarray | None = None,
) -> list[list[tuple[int, float]]]:
    """Per query particle, the k best (particle, best similarity over its query vectors and the
    particle's rows), in float64, by plain loops over the particles."""
    out = []
    for q in range(len(queries[0])):
        best: dict[int, float] = {}
        for vecs, ok in zip(queries, valid):
            if not ok[q]:
                continue
            sims = rows.astype(np.float64) @ vecs[q].astype(np.float64)
            for r, s in enumerate(sims):
                p = int(row_particle[r])
                if exclude is not None and p == exclude[q]:
                    continue
                best[p] = max(best.get(p, -np.inf), s)
        out.append(sorted(best.items(), key=lambda kv: -kv[1])[:k])
    return out


@pytest.fixture
def ix() -> SimpleNamespace:
    return SimpleNamespace(
        unit=unit,
        centres=centres,
        clustered_set=clustered_set,
        image_only=image_only,
        write_shards=write_shards,
        brute_neighbours=brute_neighbours,
    )


@pytest.fixture(autouse=True)
def _one_faiss_thread(faiss_one_thread) -> None:
    """Every test here runs FAISS single-threaded (root conftest)."""
