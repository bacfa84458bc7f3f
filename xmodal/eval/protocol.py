"""The paper's few-shot gallery protocol over embeddings: every gallery-query combination, gallery
sizes n per class, seeded repeats (and optional stratified folds).

Modes
* ``single`` (``queries=None``): the gallery is drawn from the set, the other labelled particles of
  the set are the queries. With ``folds=F`` the set is split into F stratified, seeded folds; fold f
  is the query set and the gallery is drawn from the other folds (the paper's LAB k-fold setting).
* ``split``: the gallery is drawn from ``gallery``, the queries are all of ``queries`` (a test split,
  or another domain: cross-domain LAB->SEA is split mode with different domains).

Rules
* Only labelled particles take part. Combination "G-Q" (e.g. "I+P-P") = gallery modalities G,
  query modalities Q; see ``knn.py`` for the vote and its ties.
* Gallery sampling: each repeat gives every gallery-pool particle a seeded random key; the gallery
  of size n takes, per class, the n eligible particles with the smallest keys (a class with fewer
  than n gives all it has). So each gallery is a uniform sample of n per class, galleries of a repeat
  are nested in n, and combinations that need the same modalities share the same gallery.
* A particle lacking a modality that a combination needs is excluded from that cell, and counted
  (``excluded_gallery`` / ``excluded_queries``).
* A query whose class has no particle in the gallery (split mode: a class absent from the gallery
  set; or one whose gallery particles all lack the combination's modalities) can never be right; it
  stays a query and an error, as in the paper, and is counted (``unreachable_queries``), which caps
  the cell's accuracy. In single mode a class with at most n particles gives all of them to the
  gallery and no query, so larger n are scored on fewer classes (``query_classes``).
* Metrics per run: accuracy and macro precision / recall / F1 over the classes that occur among the
  true or predicted labels (scikit-learn's ``average="macro"``, 0 for an undefined ratio), reported as
  mean and population std over repeats x folds, like the authors' notebook; the confusion matrix and
  per-class recall are pooled over runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from xmodal.config import ConfigError
from xmodal.data.quarantine import DataError
from xmodal.eval.embeddings import EmbeddingSet
from xmodal.eval.knn import (
    Nearest,
    Shortlist,
    decide,
    faiss_search,
    join_gallery,
    l2_normalize,
    nearest,
    shortlist_width,
)

_SIDES = {"I": ("image",), "P": ("profile",), "I+P": ("image", "profile")}
COMBOS: tuple[str, ...] = tuple(f"{g}-{q}" for g in _SIDES for q in _SIDES)
METRICS = ("accuracy", "precision", "recall", "f1")


def parse_combo(combo: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """ "I+P-P" (or the authors' "I+P - P") -> (("image", "profile"), ("profile",))."""
    parts = combo.replace(" ", "").split("-")
    if len(parts) != 2 or parts[0] not in _SIDES or parts[1] not in _SIDES:
        raise ConfigError(
            f"unknown combination {combo!r}: use GALLERY-QUERY with each of I, P, I+P, e.g. {COMBOS}"
        )
    return _SIDES[parts[0]], _SIDES[parts[1]]


def canonical_combo(combo: str) -> str:
    return combo.replace(" ", "")


@dataclass
class Cell:
    """One (combination, n, k) cell: a value per run for every metric, counts per run."""

    combo: str
    n: int
    k: int
    n_classes: int
    accuracy: list[float] = field(default_factory=list)
    precision: list[float] = field(default_factory=list)
    recall: list[float] = field(default_factory=list)
    f1: list[float] = field(default_factory=list)
    gallery_size: list[int] = field(default_factory=list)
    n_queries: list[int] = field(default_factory=list)
    excluded_gallery: list[int] = field(default_factory=list)
    excluded_queries: list[int] = field(default_factory=list)
    unreachable_queries: list[int] = field(default_factory=list)  # of a class absent from the gallery
    query_classes: list[int] = field(default_factory=list)  # classes that have queries
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> runs without a result
    predictions: list[dict[str, np.ndarray]] = field(default_factory=list)  # keep_predictions only
    confusion: np.ndarray = field(init=False)
    unreachable_by_class: np.ndarray = field(init=False)  # pooled over runs, like the confusion matrix

    def __post_init__(self) -> None:
        self.confusion = np.zeros((self.n_classes, self.n_classes), dtype=np.int64)
        self.unreachable_by_class = np.zeros(self.n_classes, dtype=np.int64)

    def ceiling(self) -> list[float]:
        """Per run, the best accuracy possible: the share of queries whose class is in the gallery."""
        return [1 - u / q for u, q in zip(self.unreachable_queries, self.n_queries)]

    def mean(self, metric: str = "accuracy") -> float:
        values = getattr(self, metric)
        return float(np.mean(values)) if values else math.nan

    def std(self, metric: str = "accuracy") -> float:
        values = getattr(self, metric)
        return float(np.std(values)) if values else math.nan

    def per_class_recall(self) -> np.ndarray:
        """Recall per class pooled over runs; NaN for a class that never was a query."""
        support = self.confusion.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(support > 0, np.diag(self.confusion) / support, np.nan)


@dataclass
class ProtocolResult:
    name: str
    mode: str
    classes: list[str]
    combos: list[str]
    gallery_sizes: list[int]
    ks: list[int]
    repeats: int
    folds: int | None
    seed: int
    counts: dict[str, int]
    cells: dict[tuple[str, int, int], Cell]

    def cell(self, combo: str, n: int, k: int | None = None) -> Cell:
        return self.cells[(canonical_combo(combo), n, self.ks[0] if k is None else k)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mode": self.mode,
            "classes": self.classes,
            "combos": self.combos,
            "gallery_sizes": self.gallery_sizes,
            "k": self.ks,
            "repeats": self.repeats,
            "folds": self.folds,
            "seed": self.seed,
            "counts": self.counts,
            "cells": [_cell_dict(c, self.classes) for c in self.cells.values()],
        }


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def _cell_dict(c: Cell, classes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"combo": c.combo, "n": c.n, "k": c.k, "runs": len(c.accuracy)}
    for m in METRICS:
        out[m] = {"mean": _nan_to_none(c.mean(m)), "std": _nan_to_none(c.std(m)), "values": getattr(c, m)}
    for key in (
        "gallery_size",
        "n_queries",
        "excluded_gallery",
        "excluded_queries",
        "unreachable_queries",
        "query_classes",
    ):
        out[key] = getattr(c, key)
    ceiling = c.ceiling()
    out["accuracy_ceiling"] = {"mean": float(np.mean(ceiling)) if ceiling else None, "values": ceiling}
    out["unreachable_by_class"] = {cls: int(u) for cls, u in zip(classes, c.unreachable_by_class) if u}
    out["skipped"] = c.skipped
    recall = c.per_class_recall()
    out["per_class_recall"] = {cls: _nan_to_none(float(r)) for cls, r in zip(classes, recall)}
    out["confusion"] = c.confusion.tolist()
    return out


@dataclass
class _Side:
    """Labelled particles of one input set: class codes and unit embeddings per modality."""

    rows: np.ndarray  # row numbers in the input EmbeddingSet
    codes: np.ndarray
    valid: dict[str, np.ndarray]
    vec64: dict[str, np.ndarray]
    vec32: dict[str, np.ndarray]

    @staticmethod
    def build(es: EmbeddingSet, class_index: dict[str, int], what: str) -> _Side:
        rows = np.flatnonzero(es.labelled)
        valid, vec64, vec32 = {}, {}, {}
        for m in ("image", "profile"):
            ok = es.valid(m)[rows]
            if ok.all():  # the common case: no zero-filled copy to scatter into
                v = l2_normalize(
                    es.emb(m) if len(rows) == len(es) else es.emb(m)[rows], f"{what} {m} embeddings"
                )
            else:
                v = np.zeros((len(rows), es.emb(m).shape[1]))
                if ok.any():
                    v[ok] = l2_normalize(es.emb(m)[rows[ok]], f"{what} {m} embeddings")
            valid[m], vec64[m], vec32[m] = ok, v, v.astype(np.float32)
        codes = np.array([class_index[c] for c in es.label[rows]], dtype=np.int64)
        return _Side(rows, codes, valid, vec64, vec32)

    def eligible(self, mods: tuple[str, ...]) -> np.ndarray:
        return np.logical_and.reduce([self.valid[m] for m in mods])


def stratified_folds(codes: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number per particle: each class shuffled (seeded) and dealt round-robin, continuing
    where the previous class stopped, so class and fold sizes differ by at most one."""
    if folds < 2:
        raise ConfigError(f"folds={folds}: need at least 2 folds (or None for no folds)")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xF01D]))
    fold = np.empty(len(codes), dtype=np.int64)
    start = 0
    for c in np.unique(codes):
        rows = rng.permutation(np.flatnonzero(codes == c))
        fold[rows] = (start + np.arange(len(rows))) % folds
        start += len(rows)
    return fold


def sample_gallery(codes: np.ndarray, keys: np.ndarray, eligible: np.ndarray, n: int) -> np.ndarray:
    """Per class, the ``n`` eligible particles with the smallest keys (all of them if fewer);
    returns sorted positions into ``codes``."""
    cand = np.flatnonzero(eligible)
    order = cand[np.lexsort((keys[cand], codes[cand]))]  # by class, then key
    cls = codes[order]
    first = np.searchsorted(cls, cls, side="left")
    rank = np.arange(len(order)) - first
    return np.sort(order[rank < n])


def _metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> tuple[list[float], np.ndarray]:
    conf = np.bincount(y_true * n_classes + y_pred, minlength=n_classes**2).reshape(n_classes, n_classes)
    tp = np.diag(conf).astype(np.float64)
    support, predicted = conf.sum(axis=1), conf.sum(axis=0)
    present = (support > 0) | (predicted > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    acc = float(tp.sum() / len(y_true))
    return [
        acc,
        float(precision[present].mean()),
        float(recall[present].mean()),
        float(f1[present].mean()),
    ], conf


@dataclass
class _Run:
    """One (fold, repeat): who may be drawn into the gallery and who is queried."""

    gallery_pool: np.ndarray  # positions in the gallery side
    query_pool: np.ndarray  # positions in the query side
    keys: np.ndarray  # one random key per gallery-side particle
    same_set: bool  # single mode without folds: a cell's gallery is removed from its queries


def _runs(gal: _Side, qry: _Side, single: bool, repeats: int, seed: int, folds: int | None) -> Iterator[_Run]:
    fold_of = stratified_folds(gal.codes, folds, seed) if folds else None
    everyone = np.arange(len(gal.codes))
    for f in range(folds or 1):
        for r in range(repeats):
            rng = np.random.default_rng(np.random.SeedSequence([seed, f, r]))
            keys = rng.random(len(gal.codes))
            if fold_of is not None:
                yield _Run(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f), keys, False)
            elif single:
                yield _Run(everyone, everyone, keys, True)
            else:
                yield _Run(everyone, np.arange(len(qry.codes)), keys, False)


def run_protocol(
    gallery: EmbeddingSet,
    queries: EmbeddingSet | None,
    combos: Sequence[str] = COMBOS,
    gallery_sizes: Sequence[int] = (1, 2, 4, 8, 16),
    k: int | Sequence[int] = 3,
    repeats: int = 5,
    seed: int = 0,
    folds: int | None = None,
    name: str = "",
    progress: bool = True,
    keep_predictions: bool = False,
) -> ProtocolResult:
    """Run the protocol (module docstring). ``keep_predictions`` stores, per cell and run, the
    gallery and query row numbers (into the input sets) and the predicted class codes."""
    combos = list(dict.fromkeys(canonical_combo(c) for c in combos))
    parsed = {c: parse_combo(c) for c in combos}
    ks = sorted({int(k)} if isinstance(k, (int, np.integer)) else {int(x) for x in k})
    sizes = sorted({int(n) for n in gallery_sizes})
    if not combos or not sizes or not ks or min(ks) < 1 or min(sizes) < 1 or repeats < 1:
        raise ConfigError(
            f"run_protocol: need combos, gallery sizes >= 1, k >= 1, repeats >= 1; got "
            f"{combos}, {sizes}, {ks}, {repeats}"
        )
    if folds is not None and folds < 2:
        raise ConfigError(f"folds={folds}: need at least 2 folds (or None for no folds)")
    if queries is not None and folds:
        raise ConfigError(
            "run_protocol: folds split one set into gallery/query folds; with a query set given "
            "(split mode) pass folds=None"
        )
    single = queries is None
    qset = gallery if single else queries
    names = {x for x in gallery.label if x is not None} | {x for x in qset.label if x is not None}
    if not names or not gallery.labelled.any() or not qset.labelled.any():
        raise DataError(
            f"run_protocol{f' ({name})' if name else ''}: the gallery and query sets need labelled "
            "particles; got none (labels are null / 'unlabelled')"
        )
    classes = sorted(names)
    index = {c: i for i, c in enumerate(classes)}
    gal = _Side.build(gallery, index, "gallery")
    qry = gal if single else _Side.build(qset, index, "query")
    counts = {"gallery_set": len(gallery), "gallery_labelled": len(gal.codes)}
    if not single:
        counts |= {
            "query_set": len(qset),
            "query_labelled": len(qry.codes),
            # the classes may differ between the sets: queries of a class absent from the gallery
            # can never be right (counted per cell as unreachable_queries)
            "gallery_classes": len(np.unique(gal.codes)),
            "query_classes": len(np.unique(qry.codes)),
            "queries_class_not_in_gallery": int(np.isin(qry.codes, gal.codes, invert=True).sum()),
        }
    cells = {(c, n, kk): Cell(c, n, kk, len(classes)) for c in combos for n in sizes for kk in ks}
    n_runs = (folds or 1) * repeats
    bar = tqdm(
        total=n_runs, desc=f"gallery k-NN {name}".strip(), unit="run", disable=not progress, mininterval=2
    )
    for run in _runs(gal, qry, single, repeats, seed, folds):
        _evaluate_run(run, gal, qry, parsed, sizes, ks, cells, keep_predictions)
        bar.update(1)
    bar.close()
    return ProtocolResult(
        name, "single" if single else "split", classes, combos, sizes, ks, repeats, folds, seed, counts, cells
    )


class _SizeRun:
    """One gallery size n of one run: each gallery is drawn once per modality set, each FAISS search
    made once per gallery sample and modality pair, and each float64-certified top-k once per
    gallery, query modality and k; the combinations that need them share them. Searches and top-k
    cover the whole query pool of a modality; a cell takes its rows from them."""

    def __init__(self, run: _Run, gal: _Side, qry: _Side, qrows: dict, qmat: dict, n: int, max_k: int):
        self.run, self.gal, self.qry, self.qrows, self.qmat = run, gal, qry, qrows, qmat
        self.n, self.max_k = n, max_k
        self._galleries: dict[tuple[str, ...], np.ndarray] = {}
        self._joined: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray, float]] = {}
        self._searched: dict[tuple[bytes, str, str], Shortlist] = {}
        self._nearest: dict[tuple[tuple[str, ...], str, int], Nearest] = {}

    def gallery(self, gmods: tuple[str, ...]) -> np.ndarray:
        """Positions (gallery side) of the gallery for a combination with gallery modalities ``gmods``."""
        if gmods not in self._galleries:
            pool = self.run.gallery_pool
            ok = self.gal.eligible(gmods)[pool]
            self._galleries[gmods] = pool[
                sample_gallery(self.gal.codes[pool], self.run.keys[pool], ok, self.n)
            ]
        return self._galleries[gmods]

    def joined(self, gmods: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, float]:
        """The gallery's entries (image rows, then profile rows; float64), their labels, the tolerance."""
        if gmods not in self._joined:
            g_idx = self.gallery(gmods)
            self._joined[gmods] = join_gallery(
                {m: self.gal.vec64[m][g_idx] for m in gmods}, self.gal.codes[g_idx]
            )
        return self._joined[gmods]

    def nearest(self, gmods: tuple[str, ...], qm: str, k: int, q_idx: np.ndarray) -> Nearest:
        """The top k of the gallery for the query rows ``q_idx`` (a sorted subset of qrows[qm])."""
        if (gmods, qm, k) not in self._nearest:
            g_idx = self.gallery(gmods)
            width = shortlist_width(self.max_k, len(g_idx))
            parts = []
            for gm in gmods:  # gallery I and I+P share the searches of the same sample
                key = (g_idx.tobytes(), gm, qm)
                if key not in self._searched:
                    self._searched[key] = faiss_search(self.gal.vec32[gm][g_idx], self.qmat[qm], width)
                parts.append(self._searched[key])
            gallery_all, _, tol = self.joined(gmods)
            self._nearest[(gmods, qm, k)] = nearest(
                parts, gallery_all, self.qry.vec64[qm], self.qrows[qm], k, tol
            )
        everyone = self._nearest[(gmods, qm, k)]
        if len(q_idx) == len(self.qrows[qm]):  # then q_idx is qrows[qm]: both sorted
            return everyone
        return everyone.take(np.searchsorted(self.qrows[qm], q_idx))


def _evaluate_run(
    run: _Run,
    gal: _Side,
    qry: _Side,
    parsed: dict[str, tuple[tuple[str, ...], tuple[str, ...]]],
    sizes: list[int],
    ks: list[int],
    cells: dict[tuple[str, int, int], Cell],
    keep: bool,
) -> None:
    n_classes = next(iter(cells.values())).n_classes
    qmods_used = {m for _, qmods in parsed.values() for m in qmods}
    qrows = {m: run.query_pool[qry.valid[m][run.query_pool]] for m in qmods_used}
    qmat = {
        m: qry.vec32[m] if len(qrows[m]) == len(qry.codes) else qry.vec32[m][qrows[m]] for m in qmods_used
    }
    for n in sizes:
        size_run = _SizeRun(run, gal, qry, qrows, qmat, n, max(ks))
        for combo, (gmods, qmods) in parsed.items():
            pool_ok = gal.eligible(gmods)[run.gallery_pool]
            g_idx = size_run.gallery(gmods)
            candidates = np.setdiff1d(run.query_pool, g_idx) if run.same_set else run.query_pool
            ok = qry.eligible(qmods)[candidates]
            q_idx = candidates[ok]
            if len(g_idx) == 0 or len(q_idx) == 0:
                reason = "no eligible gallery particle" if len(g_idx) == 0 else "no eligible query particle"
                for k in ks:
                    cells[(combo, n, k)].skipped[reason] = cells[(combo, n, k)].skipped.get(reason, 0) + 1
                continue
            gallery_all, labels_all, tol = size_run.joined(gmods)
            queries64 = {m: qry.vec64[m] for m in qmods}
            true = qry.codes[q_idx]
            in_gallery = np.zeros(n_classes, bool)
            in_gallery[gal.codes[g_idx]] = True
            unreachable = true[~in_gallery[true]]  # the vote names gallery classes only: always errors
            for k in ks:
                near = [size_run.nearest(gmods, qm, k, q_idx) for qm in qmods]
                pred = decide(near, gallery_all, labels_all, queries64, q_idx, n_classes, tol)
                cell = cells[(combo, n, k)]
                values, conf = _metrics(true, pred, n_classes)
                for metric, v in zip(METRICS, values):
                    getattr(cell, metric).append(v)
                cell.confusion += conf
                cell.gallery_size.append(len(g_idx))
                cell.n_queries.append(len(q_idx))
                cell.excluded_gallery.append(int((~pool_ok).sum()))
                cell.excluded_queries.append(int((~ok).sum()))
                cell.unreachable_queries.append(len(unreachable))
                cell.unreachable_by_class += np.bincount(unreachable, minlength=n_classes)
                cell.query_classes.append(len(np.unique(true)))
                if keep:
                    cell.predictions.append(
                        {"gallery": gal.rows[g_idx], "queries": qry.rows[q_idx], "pred": pred}
                    )


def gallery_score(
    es: EmbeddingSet, combo: str = "I+P-I+P", n: int = 4, k: int = 3, repeats: int = 3, seed: int = 0
) -> float:
    """Mean accuracy of one combination in single mode: the per-epoch validation score. NaN when
    the set has no particle with the modalities the combination needs."""
    result = run_protocol(es, None, [combo], [n], k, repeats, seed, progress=False)
    return result.cell(combo, n, k).mean("accuracy")
