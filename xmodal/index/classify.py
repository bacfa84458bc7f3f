"""``xmodal classify``: new particles -> gallery k-NN with the paper's vote, and open-set rejection.

The gallery is a labelled embeddings folder (searched exactly) or an index built from one. Per
query particle, each of its query vectors (image, profile, or both for I+P) brings its k nearest
gallery rows, and all of them vote with weight 1 / (1 - cosine) (``xmodal.eval.knn.vote``).

* ``confidence``: the winning class's share of the vote weight;
* ``similarity``: cosine similarity of the nearest gallery row;
* ``score`` (the open-set score): the mean over the neighbours of their similarity (floored at 0)
  when they belong to the winning class and 0 when not. It is high only when the neighbours both
  agree and are close; an unseen species or detritus is far from every gallery class, so it scores
  low even when its few neighbours happen to agree.

A particle whose score is below the threshold is predicted ``unknown``. The threshold is set, or
calibrated by leave-one-out on the gallery: each gallery particle is classified against the others,
and the threshold is the largest that still accepts ``accept`` of them. Since ``unknown`` names the
rejected particles, a gallery may not have a class of that name.

A particle with no embedding of the query kind (no image, with ``query_kind="image"``) is not
searched at all: it is predicted ``no_image`` (``outputs.NOT_CLASSIFIED``), not ``unknown``, and
counted apart. Gallery and queries must come from one checkpoint (else their vectors are not
comparable): the recorded checkpoints are compared before anything is searched.
"""

from __future__ import annotations

import functools
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xmodal.config import ConfigError
from xmodal.data.quarantine import DataError
from xmodal.data.schema import parquet_files
from xmodal.eval.embeddings import (
    Checkpoint,
    EmbeddingSet,
    check_same_checkpoint,
    embeddings_checkpoint,
    load_embeddings,
)
from xmodal.eval.knn import vote
from xmodal.eval.progress import ProgressLog
from xmodal.index.html import contact_sheet, sheet_images
from xmodal.index.outputs import (
    NOT_CLASSIFIED,
    PREDICTION_SCHEMA,
    RESERVED,
    UNKNOWN,
    PredictionWriter,
    check_volume,
    classified,
)
from xmodal.index.search import QueryVectors, check_k, search_index, search_rows, top_particles
from xmodal.index.store import META_FILE, index_checkpoint, load_index
from xmodal.index.vectors import kind_rows, modalities, query_vectors


@dataclass
class Gallery:
    """Labelled rows to vote with: a search index over them and, per row, its class code and particle."""

    index: faiss.Index
    kind: str
    codes: np.ndarray  # (rows,) class code per row
    classes: list[str]  # code -> class name (sorted)
    particle: np.ndarray  # (rows,) particle code per row (0..P-1)
    particle_id: np.ndarray  # (P,) ids
    # modality -> (P, D) vectors and valid (P,): each gallery particle as a query (leave-one-out)
    vectors: dict[str, tuple[np.ndarray, np.ndarray]]
    source: str
    checkpoint: Checkpoint | None = None  # the model that embedded it, when recorded

    @functools.cached_property
    def particle_label(self) -> np.ndarray:
        """(P,) class name of each gallery particle."""
        out = np.empty(len(self.particle_id), dtype=object)
        out[self.particle] = np.asarray(self.classes, dtype=object)[self.codes]
        return out


def _encode(labels: np.ndarray, source: str | Path) -> tuple[np.ndarray, list[str]]:
    """Class codes of ``labels`` (in sorted class order) and the classes; refuses a class named like
    the rejection label (or a not-classified one), which would make its predictions
    indistinguishable from rejected ones."""
    classes = sorted(set(labels.tolist()))
    taken = [c for c in RESERVED if c in classes]
    if taken:
        raise DataError(
            f"{source}: the gallery has a class named {taken[0]!r}, a name classify gives particles it "
            "rejects or cannot search; rename that class (e.g. 'unidentified') or leave its particles "
            "out of the gallery"
        )
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup[v] for v in labels], dtype=np.int64), classes


def gallery_from_embeddings(path: str | Path, kind: str = "fused") -> Gallery:
    """An exact gallery from a labelled embeddings folder; unlabelled particles are left out."""
    es = load_embeddings(path)
    keep = es.labelled
    if not keep.any():
        raise DataError(f"{path}: no labelled particles; a gallery needs labels (the `label` column)")
    es = es.subset(keep)
    rows = kind_rows(es, kind, where=str(path))
    if len(rows.particle) == 0:
        raise DataError(f"{path}: no {kind} embeddings among the labelled particles; choose another --kind")
    index = faiss.IndexFlatIP(rows.vectors.shape[1])
    index.add(rows.vectors)
    codes, classes = _encode(es.label[rows.particle], path)
    vectors = query_vectors(es, "fused")
    return Gallery(
        index,
        kind,
        codes,
        classes,
        rows.particle,
        es.particle_id,
        vectors,
        str(path),
        embeddings_checkpoint(path),
    )


def gallery_from_index(path: str | Path, use_gpu: bool | None = None) -> Gallery:
    """A gallery from an index whose rows are all labelled (built from gallery embeddings)."""
    stored = load_index(path)
    unlabelled = np.array([v is None for v in stored.ids.label])
    if unlabelled.any():
        raise DataError(
            f"{path}: {int(unlabelled.sum())} of {len(unlabelled)} index rows are unlabelled (e.g. particle "
            f"{stored.ids.particle_id[unlabelled][0]}); build the gallery index from labelled embeddings only"
        )
    codes, classes = _encode(stored.ids.label, path)
    n_part = int(stored.ids.particle.max()) + 1
    first = stored.ids.first_row
    vectors = {}
    for m in ("image", "profile"):
        sel = np.flatnonzero(stored.ids.modality == m)
        vecs, valid = np.zeros((n_part, stored.index.d), np.float32), np.zeros(n_part, bool)
        if len(sel):
            vecs[stored.ids.particle[sel]] = stored.index.reconstruct_batch(sel)
            valid[stored.ids.particle[sel]] = True
        vectors[m] = (vecs, valid)
    return Gallery(
        search_index(stored, use_gpu),
        stored.kind,
        codes,
        classes,
        stored.ids.particle,
        stored.ids.particle_id[first],
        vectors,
        str(path),
        index_checkpoint(stored.meta),
    )


def open_gallery(path: str | Path, kind: str = "fused", use_gpu: bool | None = None) -> Gallery:
    """An index folder (has meta.json) or a labelled embeddings folder/file."""
    if (Path(path) / META_FILE).exists():
        return gallery_from_index(path, use_gpu)
    return gallery_from_embeddings(path, kind)


@dataclass
class Votes:
    best: np.ndarray  # (Q,) class code, -1 = no neighbour
    confidence: np.ndarray  # (Q,)
    similarity: np.ndarray  # (Q,) nearest row's cosine, nan = none
    score: np.ndarray  # (Q,) open-set score
    neighbours: np.ndarray  # (Q, k) gallery particle codes, -1 padded, best first
    neighbour_sims: np.ndarray  # (Q, k)


def _drop_self(
    sims: np.ndarray, rows: np.ndarray, particle: np.ndarray, own: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` listed rows that are not the query particle's own."""
    other = (rows >= 0) & (particle[np.maximum(rows, 0)] != own[:, None])
    order = np.argsort(~other, axis=1, kind="stable")[:, :k]
    keep = np.take_along_axis(other, order, axis=1)
    return (
        np.where(keep, np.take_along_axis(sims, order, axis=1), -np.inf),
        np.where(keep, np.take_along_axis(rows, order, axis=1), -1),
    )


def vote_queries(
    gallery: Gallery, queries: QueryVectors, k: int = 3, exclude: np.ndarray | None = None
) -> Votes:
    """The paper's vote for each query particle; ``exclude`` (gallery particle codes) leaves each
    query's own rows out (leave-one-out). Each query vector votes with its ``k`` nearest rows; the
    neighbours listed are the ``k`` nearest distinct particles, from ``rows per particle x k`` rows
    (enough to hold k distinct ones when a fused gallery lists a particle twice)."""
    per_particle = len(modalities(gallery.kind))
    wide = per_particle * k
    all_s, all_r, list_s, list_p = [], [], [], []
    for vecs, valid in queries.values():
        s, r = search_rows(gallery.index, vecs, wide + (per_particle if exclude is not None else 0), valid)
        if exclude is not None:
            s, r = _drop_self(s, r, gallery.particle, exclude, wide)
        all_s.append(s[:, :k])
        all_r.append(r[:, :k])
        list_s.append(s)
        list_p.append(np.where(r >= 0, gallery.particle[np.maximum(r, 0)], -1))
    sims, rows = np.concatenate(all_s, axis=1).astype(np.float64), np.concatenate(all_r, axis=1)
    present = rows >= 0
    labels = np.where(present, gallery.codes[np.maximum(rows, 0)], 0)
    distances = np.where(present, np.maximum(1.0 - sims, 0.0), np.inf)  # inf: no weight
    best, votes = vote(labels, distances, len(gallery.classes))
    total = votes.sum(axis=1)
    none = total == 0
    best = np.where(none, -1, best)
    agree = present & (labels == best[:, None])
    n_present = np.maximum(present.sum(axis=1), 1)
    score = np.where(agree, np.maximum(sims, 0.0), 0.0).sum(axis=1) / n_present
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.where(none, 0.0, votes[np.arange(len(best)), np.maximum(best, 0)] / total)
    similarity = np.where(present.any(axis=1), np.where(present, sims, -np.inf).max(axis=1), np.nan)
    top_p, top_s = top_particles(np.concatenate(list_s, axis=1), np.concatenate(list_p, axis=1), k)
    return Votes(best, confidence, similarity, score, top_p, top_s)


def leave_one_out(gallery: Gallery, k: int, query_kind: str) -> tuple[Votes, np.ndarray]:
    """Each gallery particle voted on by the others; returns the votes and the particles' class codes."""
    queries = {m: gallery.vectors[m] for m in modalities(query_kind)}
    has_query = np.logical_or.reduce([v for _, v in queries.values()])
    if not has_query.any():
        raise DataError(
            f"gallery {gallery.source} has no {query_kind} embeddings to calibrate with; "
            "pass --threshold, or a gallery with those embeddings"
        )
    sel = np.flatnonzero(has_query)
    queries = {m: (v[sel], ok[sel]) for m, (v, ok) in queries.items()}
    particle_class = np.full(len(gallery.particle_id), -1, dtype=np.int64)
    particle_class[gallery.particle] = gallery.codes
    return vote_queries(gallery, queries, k, exclude=sel), particle_class[sel]


def calibrate(gallery: Gallery, k: int, accept: float, query_kind: str) -> dict[str, Any]:
    """The open-set threshold that accepts ``accept`` of the gallery under leave-one-out: the
    largest score that at least ``accept`` of the gallery's scores reach."""
    if not 0 < accept <= 1:
        raise ConfigError(f"--accept {accept}: must be a fraction in (0, 1]")
    loo, truth = leave_one_out(gallery, k, query_kind)
    scores = np.sort(loo.score)
    # particles to accept; the slack keeps accept * n that is whole on paper (0.9 x 10) from rounding up
    need = max(1, math.ceil(accept * len(scores) - 1e-9))
    threshold = float(scores[len(scores) - need])
    counts = np.bincount(truth, minlength=len(gallery.classes))
    return {
        "threshold": threshold,
        "accept_target": accept,
        "gallery_accepted": float((loo.score >= threshold).mean()),
        "gallery_loo_accuracy": float((loo.best == truth).mean()),
        "gallery_particles": int(len(truth)),
        "classes_with_one_particle": [c for c, n in zip(gallery.classes, counts) if n == 1],
    }


def _lists(values: np.ndarray, present: np.ndarray, type_: pa.DataType) -> pa.Array:
    """(Q, k) values -> Q lists of the ``present`` ones, in order."""
    offsets = np.zeros(len(present) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum(present.sum(axis=1))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[present].tolist(), type=type_))


def prediction_table(
    es: EmbeddingSet,
    v: Votes,
    gallery: Gallery,
    threshold: float,
    searched: np.ndarray | None = None,
    query_kind: str = "fused",
) -> pa.Table:
    """One row per query particle (``outputs.PREDICTION_SCHEMA``). ``searched`` (default all):
    particles that had a query vector of ``query_kind``; the others were never compared with the
    gallery, so they are not ``unknown`` (rejected) but ``NOT_CLASSIFIED[query_kind]``."""
    names = np.array([*gallery.classes, None], dtype=object)  # code -1 -> None
    best = names[v.best]
    accepted = (v.best >= 0) & (v.score >= threshold)
    searched = np.ones(len(es), bool) if searched is None else np.asarray(searched, bool)
    prediction = np.where(searched, np.where(accepted, best, UNKNOWN), NOT_CLASSIFIED[query_kind])
    present = v.neighbours >= 0
    nearest = np.maximum(v.neighbours, 0)
    columns = {
        "particle_id": es.particle_id.tolist(),
        "domain": es.domain.tolist(),
        "label": es.label.tolist(),
        "prediction": prediction.tolist(),
        "best_class": best.tolist(),
        "confidence": v.confidence,
        "similarity": v.similarity,
        "score": v.score,
    }
    table = pa.table(
        {f.name: pa.array(columns[f.name], type=f.type) for f in PREDICTION_SCHEMA if f.name in columns}
    )
    return (
        table.append_column("neighbour_ids", _lists(gallery.particle_id[nearest], present, pa.string()))
        .append_column("neighbour_labels", _lists(gallery.particle_label[nearest], present, pa.string()))
        .append_column("neighbour_scores", _lists(v.neighbour_sims.astype(np.float32), present, pa.float32()))
    )


def _sample_key(ids: list[str]) -> np.ndarray:
    """A stable pseudo-random key per particle id: the same sample whatever the shard order."""
    return np.array([zlib.crc32(i.encode()) for i in ids], dtype=np.int64)


def classify(
    gallery: str | Path,
    queries: str | Path,
    out: str | Path,
    k: int = 3,
    kind: str = "fused",
    query_kind: str | None = None,
    threshold: float | None = None,
    accept: float = 0.95,
    volume_ml: float | None = None,
    html: bool = False,
    particles: str | Path | None = None,
    gallery_particles: str | Path | None = None,
    html_sample: int = 24,
    use_gpu: bool | None = None,
) -> dict[str, Any]:
    """Classify every particle of ``queries`` (embeddings) against ``gallery`` into ``out``.

    ``kind`` is the gallery's embedding kind when it is an embeddings folder (an index knows its
    own); ``query_kind`` defaults to the gallery's. ``threshold`` None = calibrate by leave-one-out
    to accept ``accept`` of the gallery. ``html`` needs the particles' Parquet of the queries
    (``particles``) and of the gallery (``gallery_particles``) for their images.
    """
    check_k(k)
    check_volume(volume_ml)
    if html and (particles is None or gallery_particles is None):
        raise ConfigError(
            "--html needs --particles (the queries' particle Parquet) and --gallery-particles "
            "(the gallery's) to show their images"
        )
    g = open_gallery(gallery, kind, use_gpu)
    check_same_checkpoint(g.source, g.checkpoint, queries, embeddings_checkpoint(queries))
    qk = query_kind or g.kind
    modalities(qk)
    cal = calibrate(g, k, accept, qk) if threshold is None else {"threshold": float(threshold)}
    out = Path(out)
    writer = PredictionWriter(out)
    files = parquet_files(queries)
    log = ProgressLog("classify", sum(pq.ParquetFile(f).metadata.num_rows for f in files))
    sample: pa.Table | None = None
    for f in files:
        es = load_embeddings(f)
        qv = query_vectors(es, qk, where=str(f))
        searched = np.logical_or.reduce([ok for _, ok in qv.values()])
        pred = prediction_table(es, vote_queries(g, qv, k), g, cal["threshold"], searched, qk)
        writer.write(pred)
        if html:  # keep the html_sample smallest keys seen so far, among particles with neighbours
            pool = pred.filter(classified(pred))
            pool = pool if sample is None else pa.concat_tables([sample, pool])
            keys = _sample_key(pool.column("particle_id").to_pylist())
            sample = pool.take(np.argsort(keys, kind="stable")[:html_sample])
        log.update(len(es))
    counts = writer.close(volume_ml)
    skipped = sum(writer.not_classified.values())
    summary = {
        "gallery": g.source,
        "queries": str(queries),
        "kind": g.kind,
        "query_kind": qk,
        "k": k,
        "classes": g.classes,
        "particles": writer.rows,
        "unknown": int(writer.counts.get(UNKNOWN, 0)),
        # never searched (no embedding of the query kind): not in counts, nor in the EcoTaxa file
        "not_classified": dict(writer.not_classified),
        "calibration": cal,
        "volume_ml": volume_ml,
        "counts": counts.to_dict(orient="records"),
        "seconds": round(log.elapsed, 2),
    }
    summary_file = out / "summary.json"
    summary_file.write_text(json.dumps(summary, indent=1, default=str))
    if html and sample is not None:
        sample = sample.to_pandas().sort_values("particle_id")
        gallery_ids = {i for ids in sample["neighbour_ids"] for i in ids}
        sheet = contact_sheet(
            sample,
            sheet_images(particles, sample["particle_id"], "--particles", "query"),
            sheet_images(gallery_particles, gallery_ids, "--gallery-particles", "gallery"),
            out / "contact_sheet.html",
            title=f"xmodal classify: {Path(queries).name} vs {Path(g.source).name}",
        )
        summary["html"] = str(sheet)
        summary_file.write_text(json.dumps(summary, indent=1, default=str))
    print(
        f"[xmodal] classified {writer.rows - skipped:,} of {writer.rows:,} particles against "
        f"{len(g.classes)} classes ({summary['unknown']:,} unknown at threshold {cal['threshold']:.3f}) "
        f"in {log.elapsed:.1f}s -> {out}"
    )
    if skipped:
        print(
            f"[xmodal] {skipped:,} particles not classified: no {' or '.join(modalities(qk))} embedding "
            f"(--query-kind {qk}); left out of counts.csv and ecotaxa.tsv, listed in predictions as "
            f"{NOT_CLASSIFIED[qk]!r} (another --query-kind may classify them)"
        )
    return summary
