"""What an index holds: the rows of one embedding *kind*, taken from embedding sets.

* ``image`` / ``profile``: one row per particle that has that embedding.
* ``fused`` (I+P): **both** embeddings of each particle, as two rows, not their normalised mean.
  That is the paper's I+P gallery, so classifying against a fused index is exactly the paper's
  I+P vote (their best rule); image and profile embeddings share one CLIP space, so either kind of
  query finds both kinds of row; and a particle missing one modality is still indexed by the other.
  The price is twice the rows of a single modality.

Rows are unit vectors (float32): FAISS inner product is then cosine similarity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xmodal.config import ConfigError
from xmodal.data.quarantine import DataError
from xmodal.eval.embeddings import EmbeddingSet

KINDS = ("image", "profile", "fused")


def modalities(kind: str) -> tuple[str, ...]:
    if kind not in KINDS:
        raise ConfigError(f"unknown embedding kind {kind!r}; choose one of {', '.join(KINDS)}")
    return ("image", "profile") if kind == "fused" else (kind,)


def unit_rows(x: np.ndarray, where: str) -> np.ndarray:
    """Rows scaled to unit length in float32 (embeddings stored as float16 lose their exact norm)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise DataError(f"{where}: {int((norms == 0).sum())} embeddings are all zeros; re-run `xmodal embed`")
    return x / norms


@dataclass
class Rows:
    """Index rows of one embedding set: ``particle`` is each row's position in the set."""

    vectors: np.ndarray  # (R, D) float32, unit length
    particle: np.ndarray  # (R,) int64
    modality: np.ndarray  # (R,) object: "image" | "profile"


def kind_rows(es: EmbeddingSet, kind: str, where: str = "embeddings") -> Rows:
    """The rows ``kind`` takes from ``es``: per modality its valid embeddings, image rows first."""
    vecs, parts, mods = [], [], []
    for m in modalities(kind):
        idx = np.flatnonzero(es.valid(m))
        if len(idx):
            vecs.append(unit_rows(es.emb(m)[idx], f"{where} ({m})"))
            parts.append(idx)
            mods.append(np.full(len(idx), m, dtype=object))
    if not vecs:
        dim = max((es.emb(m).shape[1] for m in modalities(kind)), default=0)
        return Rows(np.zeros((0, dim), np.float32), np.zeros(0, np.int64), np.zeros(0, dtype=object))
    widths = {v.shape[1] for v in vecs}
    if len(widths) > 1:
        raise DataError(
            f"{where}: image and profile embeddings differ in width {sorted(widths)}; cannot fuse"
        )
    return Rows(np.concatenate(vecs), np.concatenate(parts).astype(np.int64), np.concatenate(mods))


def query_vectors(
    es: EmbeddingSet, kind: str, where: str = "queries"
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per query modality of ``kind``: (unit vectors (N, D) float32, valid (N,)); invalid rows are zeros.
    A modality no row has may be of width 0 (a shard without it): searches skip invalid rows."""
    out = {}
    for m in modalities(kind):
        valid = es.valid(m)
        vecs = np.zeros(es.emb(m).shape, np.float32)
        if valid.any():
            vecs[valid] = unit_rows(es.emb(m)[valid], f"{where} ({m})")
        out[m] = (vecs, valid)
    return out
