"""classify: the vote equals a plain float64 loop; leave-one-out calibration; open-set rejection of
unseen species and detritus; outputs (Parquet, CSV, EcoTaxa TSV, counts) open in pandas."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest

from xmodal.config import ConfigError
from xmodal.data.quarantine import DataError
from xmodal.eval.embeddings import EmbeddingSet, load_embeddings, write_embeddings
from xmodal.index.build import build_index
from xmodal.index.classify import calibrate, classify, gallery_from_embeddings, leave_one_out, vote_queries
from xmodal.index.outputs import ECOTAXA_COLUMNS
from xmodal.index.vectors import query_vectors

KNOWN = [f"sp{i:02d}" for i in range(10)]


def _plain_vote(g_rows, g_class, g_particle, queries, k, exclude=None):
    """(best class, confidence, score) of one query particle by loops: its query vectors' k
    nearest gallery rows in float64 vote with 1 / (1 - cos)."""
    slots = []
    for q in queries:
        if q is None:
            continue
        sims = [
            (float(np.dot(r.astype(np.float64), q.astype(np.float64))), c)
            for r, c, p in zip(g_rows, g_class, g_particle)
            if p != exclude
        ]
        slots += sorted(sims, key=lambda sc: -sc[0])[:k]
    totals: dict[int, float] = {}
    for s, c in slots:
        totals[c] = totals.get(c, 0.0) + 1.0 / (1.0 - s)
    best = max(totals, key=lambda c: (totals[c], -c))
    score = sum(max(s, 0.0) for s, c in slots if c == best) / len(slots)
    return best, totals[best] / sum(totals.values()), score


def _gallery(ix, tmp_path, noise=1.2):
    centre = ix.centres(16, 32, seed=11)
    es = ix.clustered_set(centre[:10], KNOWN, per_class=8, noise=noise, seed=1, prefix="G", missing_image=5)
    write_embeddings(es, tmp_path / "gallery")
    return centre, es


def test_vote_and_leave_one_out_equal_a_plain_loop(ix, tmp_path) -> None:
    centre, es = _gallery(ix, tmp_path, noise=2.0)  # overlapping classes: votes are contested
    g = gallery_from_embeddings(tmp_path / "gallery", "fused")
    rows = np.stack([g.index.reconstruct(i) for i in range(g.index.ntotal)])
    queries = ix.clustered_set(
        centre[:10], KNOWN, per_class=3, noise=2.0, seed=2, prefix="Q", missing_image=4
    )
    v = vote_queries(g, query_vectors(queries, "fused"), k=3)
    for i in range(len(queries)):
        qv = [queries.image_emb[i] if queries.image_valid[i] else None, queries.profile_emb[i]]
        best, conf, score = _plain_vote(rows, g.codes, g.particle, qv, 3)
        assert v.best[i] == best and v.confidence[i] == pytest.approx(conf, abs=1e-5)
        assert v.score[i] == pytest.approx(score, abs=1e-5)
    assert 0.3 < np.mean(v.confidence < 1) < 1  # the data are contested enough to test the weights

    loo, truth = leave_one_out(g, 3, "fused")
    for i in range(len(es)):
        qv = [es.image_emb[i] if es.image_valid[i] else None, es.profile_emb[i]]
        best, conf, score = _plain_vote(rows, g.codes, g.particle, qv, 3, exclude=i)
        assert loo.best[i] == best and loo.score[i] == pytest.approx(score, abs=1e-5)
        assert g.classes[truth[i]] == es.label[i]


def test_open_set_rejects_unseen_species_and_detritus(ix, tmp_path) -> None:
    centre, _ = _gallery(ix, tmp_path)
    g = gallery_from_embeddings(tmp_path / "gallery", "fused")
    cal = calibrate(g, k=3, accept=0.95, query_kind="fused")
    assert cal["gallery_accepted"] >= 0.95 and cal["gallery_loo_accuracy"] > 0.9
    known = ix.clustered_set(centre[:10], KNOWN, per_class=30, noise=1.2, seed=2, prefix="K")
    unseen = ix.clustered_set(centre[10:], ["unseen"] * 6, per_class=20, noise=1.2, seed=3, prefix="U")
    rng = np.random.default_rng(4)  # detritus: no shape of its own, scattered over the whole space
    n = 120
    detritus = EmbeddingSet(
        np.array([f"D{i}" for i in range(n)], dtype=object),
        np.full(n, "detritus", dtype=object),
        np.full(n, "SEA", dtype=object),
        ix.unit(rng.normal(size=(n, 32))),
        np.ones(n, bool),
        ix.unit(rng.normal(size=(n, 32))),
        np.ones(n, bool),
    )
    kept = {}
    for name, es in (("known", known), ("unseen", unseen), ("detritus", detritus)):
        v = vote_queries(g, query_vectors(es, "fused"), k=3)
        accepted = v.score >= cal["threshold"]
        kept[name] = accepted.mean()
        if name == "known":
            assert np.mean(np.asarray(g.classes, dtype=object)[v.best[accepted]] == es.label[accepted]) > 0.95
    assert kept["known"] >= 0.85, kept
    assert kept["unseen"] <= 0.2 and kept["detritus"] <= 0.2, kept


def test_classify_outputs_open_in_pandas_and_reconcile(ix, tmp_path) -> None:
    centre, _ = _gallery(ix, tmp_path)
    known = ix.clustered_set(centre[:10], KNOWN, per_class=6, noise=1.2, seed=5, prefix="K", domain="SEA")
    unseen = ix.clustered_set(
        centre[10:], [None] * 6, per_class=5, noise=1.2, seed=6, prefix="U", domain="SEA"
    )
    ix.write_shards(EmbeddingSet.concat([known, unseen]), tmp_path / "new", shards=3)
    summary = classify(tmp_path / "gallery", tmp_path / "new", tmp_path / "out", k=3, volume_ml=2.5)
    out = tmp_path / "out"

    pred = pd.read_parquet(out / "predictions.parquet")
    csv = pd.read_csv(out / "predictions.csv")
    assert len(pred) == len(csv) == 90 == summary["particles"]
    assert pred["particle_id"].tolist() == csv["particle_id"].tolist()
    assert set(pred["prediction"]) <= {*KNOWN, "unknown"}
    assert (pred["prediction"] == "unknown").sum() == summary["unknown"]
    assert all(len(n) == 3 for n in pred["neighbour_ids"]) and csv["neighbour_ids"].str.count(";").eq(2).all()
    is_known = pred["particle_id"].str.startswith("K")
    assert (pred.loc[is_known, "prediction"] == pred.loc[is_known, "label"]).mean() >= 0.85
    assert (pred.loc[~is_known, "prediction"] == "unknown").mean() >= 0.8

    with open(out / "ecotaxa.tsv") as f:
        header, types = f.readline().rstrip("\n").split("\t"), f.readline().rstrip("\n").split("\t")
    assert header == list(ECOTAXA_COLUMNS) and types == list(ECOTAXA_COLUMNS.values())
    eco = pd.read_csv(out / "ecotaxa.tsv", sep="\t", skiprows=[1], keep_default_na=False)
    assert eco["object_id"].tolist() == pred["particle_id"].tolist()
    unknown = (pred["prediction"] == "unknown").to_numpy()
    assert (eco["object_annotation_category"][unknown] == "").all()
    assert (eco["object_annotation_status"][~unknown] == "predicted").all()
    np.testing.assert_allclose(eco["object_xmodal_score"], pred["score"], atol=1e-4)

    counts = pd.read_csv(out / "counts.csv")
    assert counts["count"].sum() == 90
    assert dict(zip(counts["class"], counts["count"])) == pred["prediction"].value_counts().to_dict()
    np.testing.assert_allclose(counts["per_ml"], counts["count"] / 2.5, atol=1e-6)
    assert json.loads((out / "summary.json").read_text())["calibration"]["accept_target"] == 0.95


def test_index_gallery_classifies_like_the_embeddings_gallery(ix, tmp_path) -> None:
    centre, _ = _gallery(ix, tmp_path)
    build_index(tmp_path / "gallery", tmp_path / "gidx")
    write_embeddings(
        ix.clustered_set(centre[:12], [*KNOWN, "x", "y"], per_class=4, noise=1.2, seed=7, prefix="Q"),
        tmp_path / "new",
    )
    a = classify(tmp_path / "gallery", tmp_path / "new", tmp_path / "a")
    b = classify(tmp_path / "gidx", tmp_path / "new", tmp_path / "b", query_kind="fused")
    assert a["calibration"]["threshold"] == pytest.approx(b["calibration"]["threshold"], abs=1e-6)
    pa_, pb = (
        pd.read_parquet(tmp_path / "a" / "predictions.parquet"),
        pd.read_parquet(tmp_path / "b" / "predictions.parquet"),
    )
    assert pa_["prediction"].tolist() == pb["prediction"].tolist()
    assert pa_["neighbour_ids"].map(list).tolist() == pb["neighbour_ids"].map(list).tolist()
    np.testing.assert_allclose(pa_["score"], pb["score"], atol=1e-6)

    fixed = classify(tmp_path / "gidx", tmp_path / "new", tmp_path / "c", threshold=2.0)  # above any score
    assert fixed["unknown"] == fixed["particles"] == 48


def test_gallery_needs_labels(ix, tmp_path) -> None:
    es = ix.clustered_set(ix.centres(2, 8, seed=1), [None, None], per_class=3, noise=0.5, seed=1, prefix="N")
    write_embeddings(es, tmp_path / "g")
    with pytest.raises(DataError, match="no labelled particles"):
        gallery_from_embeddings(tmp_path / "g")
    build_index(tmp_path / "g", tmp_path / "gidx")
    with pytest.raises(DataError, match="unlabelled"):
        classify(tmp_path / "gidx", tmp_path / "g", tmp_path / "out")


def _check_plain(pred: pd.DataFrame, g, queries: EmbeddingSet, k: int) -> None:
    """Each predicted row (best class, score) equals the plain loop's over its valid query vectors."""
    rows = np.stack([g.index.reconstruct(i) for i in range(g.index.ntotal)])
    for i in range(len(queries)):
        qv = [queries.emb(m)[i] if queries.valid(m)[i] else None for m in ("image", "profile")]
        best, _, score = _plain_vote(rows, g.codes, g.particle, qv, k)
        got = pred[pred["particle_id"] == queries.particle_id[i]].iloc[0]
        assert got["best_class"] == g.classes[best] and got["score"] == pytest.approx(score, abs=1e-5)


def test_a_shard_or_gallery_without_a_modality_votes_with_the_other(ix, tmp_path) -> None:
    """A query shard with no profile column (width 0 in memory), and an image-only (DINO) gallery
    under the default fused kind, calibration included: rows vote with what they have."""
    centre, _ = _gallery(ix, tmp_path)
    both = ix.clustered_set(centre[:10], KNOWN, per_class=2, noise=1.2, seed=12, prefix="B")
    image_only = ix.image_only(
        ix.clustered_set(centre[:10], KNOWN, per_class=2, noise=1.2, seed=13, prefix="I")
    )
    write_embeddings(both, tmp_path / "q")
    write_embeddings(image_only, tmp_path / "q")  # a second shard without profiles
    assert load_embeddings(tmp_path / "q" / "part-00001.parquet").profile_emb.shape[1] == 0
    classify(tmp_path / "gallery", tmp_path / "q", tmp_path / "out", k=3, threshold=0.0)
    pred = pd.read_parquet(tmp_path / "out" / "predictions.parquet")
    g = gallery_from_embeddings(tmp_path / "gallery", "fused")
    _check_plain(pred, g, EmbeddingSet.concat([both, image_only]), 3)

    write_embeddings(ix.image_only(load_embeddings(tmp_path / "gallery")), tmp_path / "dino_gallery")
    summary = classify(tmp_path / "dino_gallery", tmp_path / "q", tmp_path / "dino_out", k=3)
    assert summary["calibration"]["gallery_particles"] == 75  # every particle with an image (5 have none)
    pred = pd.read_parquet(tmp_path / "dino_out" / "predictions.parquet")
    dino = gallery_from_embeddings(tmp_path / "dino_gallery", "fused")
    _check_plain(pred, dino, EmbeddingSet.concat([both, image_only]), 3)


def test_calibrated_threshold_is_the_largest_accepting_the_share(ix, tmp_path) -> None:
    """Against a brute-force search over the leave-one-out scores, in exact fractions: 0.9 of 80
    particles is 72 (floating point makes (1 - 0.9) x 80 = 7.99...)."""
    _gallery(ix, tmp_path)
    g = gallery_from_embeddings(tmp_path / "gallery", "fused")
    scores = leave_one_out(g, 3, "fused")[0].score
    n = len(scores)
    for accept in (0.9, 0.7, 0.95, 0.99, 0.5, 0.1, 1.0, 1e-6):
        share = Fraction(str(accept))
        best = max(t for t in scores if Fraction(int((scores >= t).sum()), n) >= share)
        cal = calibrate(g, 3, accept, "fused")
        assert cal["threshold"] == best, accept
        assert Fraction(int((scores >= cal["threshold"]).sum()), n) >= share


def test_gallery_class_named_unknown_is_refused(ix, tmp_path) -> None:
    es = ix.clustered_set(
        ix.centres(2, 8, seed=1), ["unknown", "diatom"], per_class=4, noise=0.5, seed=1, prefix="U"
    )
    write_embeddings(es, tmp_path / "g")
    with pytest.raises(DataError, match="class named 'unknown'.*rename"):
        classify(tmp_path / "g", tmp_path / "g", tmp_path / "out")
    build_index(tmp_path / "g", tmp_path / "gidx")
    with pytest.raises(DataError, match="class named 'unknown'"):
        classify(tmp_path / "gidx", tmp_path / "g", tmp_path / "out")


def test_bad_arguments_are_config_errors(ix, tmp_path) -> None:
    _gallery(ix, tmp_path)
    with pytest.raises(ConfigError, match="--accept 1.5"):
        classify(tmp_path / "gallery", tmp_path / "gallery", tmp_path / "out", accept=1.5)
    with pytest.raises(ConfigError, match="--k 0"):
        classify(tmp_path / "gallery", tmp_path / "gallery", tmp_path / "out", k=0)
