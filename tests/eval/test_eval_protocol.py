"""The gallery protocol: sampling, modes, folds, exclusions and metrics, each against an
independent computation (sklearn.metrics, the loop-based reference k-NN, plain counting)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from xmodal.eval.embeddings import EmbeddingSet
from xmodal.eval.protocol import (
    COMBOS,
    gallery_score,
    parse_combo,
    run_protocol,
    sample_gallery,
    stratified_folds,
)


def test_sample_gallery_n_per_class_all_of_small_classes_only_eligible() -> None:
    codes = np.array([0] * 10 + [1] * 2 + [2] * 5)
    keys = np.random.default_rng(0).random(len(codes))
    eligible = np.ones(len(codes), bool)
    eligible[12] = False  # one particle of class 2 lacks the modality
    picked = sample_gallery(codes, keys, eligible, 3)
    assert np.bincount(codes[picked], minlength=3).tolist() == [3, 2, 3]
    assert 12 not in picked
    for c in range(3):  # the n smallest keys among the eligible particles of the class
        cand = [i for i in range(len(codes)) if codes[i] == c and eligible[i]]
        expected = sorted(sorted(cand, key=lambda i: keys[i])[:3])
        assert sorted(picked[codes[picked] == c].tolist()) == expected


def test_parse_combo() -> None:
    assert parse_combo("I+P-P") == (("image", "profile"), ("profile",))
    assert parse_combo("I+P - I") == (("image", "profile"), ("image",))
    with pytest.raises(ValueError, match="GALLERY-QUERY"):
        parse_combo("I-X")


def test_single_mode_galleries_queries_and_determinism(ev) -> None:
    es = ev.make_set(300, 6, seed=1, unlabelled=25)
    # Class 5 gets only 3 labelled particles: fewer than n.
    label = es.label.copy()
    small = np.flatnonzero(label == "class05")
    label[small[3:]] = "class04"
    es = EmbeddingSet(
        es.particle_id, label, es.domain, es.image_emb, es.image_valid, es.profile_emb, es.profile_valid
    )
    labelled = np.flatnonzero(es.labelled)
    r1 = run_protocol(
        es, None, ["I-I", "I+P-I+P"], [1, 4], 3, 3, seed=5, progress=False, keep_predictions=True
    )
    r2 = run_protocol(
        es, None, ["I-I", "I+P-I+P"], [1, 4], 3, 3, seed=5, progress=False, keep_predictions=True
    )
    r3 = run_protocol(es, None, ["I-I"], [4], 3, 3, seed=6, progress=False, keep_predictions=True)
    for n in (1, 4):
        cell = r1.cell("I-I", n)
        assert len(cell.accuracy) == 3
        for run in cell.predictions:
            g, q = run["gallery"], run["queries"]
            per_class = {c: (es.label[g] == c).sum() for c in r1.classes}
            assert per_class == {c: min(n, (es.label[labelled] == c).sum()) for c in r1.classes}
            assert np.intersect1d(g, q).size == 0
            assert sorted(np.concatenate([g, q]).tolist()) == labelled.tolist()  # unlabelled never take part
        same = [
            np.array_equal(a["gallery"], b["gallery"])
            for a, b in zip(cell.predictions, r2.cell("I-I", n).predictions)
        ]
        assert all(same)
        # Combinations needing the same modalities share the gallery of a repeat (all particles have both).
        for a, b in zip(cell.predictions, r1.cell("I+P-I+P", n).predictions):
            np.testing.assert_array_equal(a["gallery"], b["gallery"])
    # Repeats differ from each other, another seed gives other galleries, galleries nest in n.
    g4 = [p["gallery"] for p in r1.cell("I-I", 4).predictions]
    assert not np.array_equal(g4[0], g4[1])
    assert not np.array_equal(g4[0], r3.cell("I-I", 4).predictions[0]["gallery"])
    for small_run, big_run in zip(r1.cell("I-I", 1).predictions, r1.cell("I-I", 4).predictions):
        assert set(small_run["gallery"]) <= set(big_run["gallery"])
    assert r1.cell("I-I", 4).accuracy == r2.cell("I-I", 4).accuracy


def test_predictions_and_metrics_match_independent_computations(ev) -> None:
    """Every run of every cell: predictions equal the loop-based reference on the kept gallery and
    queries; accuracy, macro P/R/F1 and the confusion matrix equal sklearn.metrics."""
    gallery = ev.make_set(120, 5, dim=12, noise=1.2, seed=2)
    queries = ev.make_set(90, 6, dim=12, noise=1.2, seed=3, domain="SEA")  # class05: not in the gallery
    result = run_protocol(
        gallery, queries, COMBOS, [1, 3], [1, 3], 2, seed=0, progress=False, keep_predictions=True
    )
    classes = result.classes
    code = {c: i for i, c in enumerate(classes)}
    assert "class05" in classes
    for (combo, _n, k), cell in result.cells.items():
        gm, qm = parse_combo(combo)
        total = np.zeros((len(classes), len(classes)), dtype=np.int64)
        for i, run in enumerate(cell.predictions):
            g, q = run["gallery"], run["queries"]
            assert len(q) == len(queries)  # split mode: every labelled query particle, every run
            gl = np.array([code[c] for c in gallery.label[g]])
            e, e_labels = ev.entries({m: gallery.emb(m)[g] for m in gm}, gl)
            dists = [ev.numpy_distances(e, queries.emb(m)[q]) for m in qm]
            np.testing.assert_array_equal(run["pred"], ev.reference_predict(dists, e_labels, k, len(classes)))
            y_true = np.array([code[c] for c in queries.label[q]])
            y_pred = run["pred"]
            p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
            assert cell.accuracy[i] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
            assert (cell.precision[i], cell.recall[i], cell.f1[i]) == pytest.approx((p, r, f), abs=1e-12)
            total += confusion_matrix(y_true, y_pred, labels=range(len(classes)))
        np.testing.assert_array_equal(cell.confusion, total)
        assert cell.mean("accuracy") == pytest.approx(np.mean(cell.accuracy))
        assert cell.std("accuracy") == pytest.approx(np.std(cell.accuracy))
        recall = cell.per_class_recall()
        assert recall[code["class05"]] == 0.0  # never in the gallery, never predicted


@pytest.mark.parametrize("mode", ["single", "split"])
def test_tied_data_with_missing_modalities_match_the_reference(ev, mode: str) -> None:
    """The protocol shares one top-k per gallery, query modality and k between combinations and
    takes subsets of it (a cell's queries lack its gallery, or a modality): on tied data (sign
    vectors, similarities exact multiples of 1/16, duplicates across classes) with particles
    missing one modality, every prediction equals the loop-based reference."""
    rng = np.random.default_rng(11)
    pool = rng.choice([-1.0, 1.0], size=(8, 16))

    def tied_set(n: int, seed: int) -> EmbeddingSet:
        r = np.random.default_rng(seed)
        image_ok, profile_ok = r.random(n) > 0.15, r.random(n) > 0.15
        image_ok[~profile_ok] = True  # every particle has at least one modality
        return EmbeddingSet(
            particle_id=np.array([f"{seed}:{i}" for i in range(n)], dtype=object),
            label=np.array([f"class{c}" for c in r.integers(0, 4, n)], dtype=object),
            domain=np.full(n, "LAB", dtype=object),
            image_emb=pool[r.integers(0, 8, n)],
            image_valid=image_ok,
            profile_emb=pool[r.integers(0, 8, n)],
            profile_valid=profile_ok,
        )

    gallery = tied_set(80, 1)
    queries = None if mode == "single" else tied_set(60, 2)
    qset = gallery if queries is None else queries
    result = run_protocol(
        gallery, queries, COMBOS, [1, 3], [1, 3], 2, seed=3, progress=False, keep_predictions=True
    )
    code = {c: i for i, c in enumerate(result.classes)}
    checked = 0
    for (combo, _n, k), cell in result.cells.items():
        gm, qm = parse_combo(combo)
        for run in cell.predictions:
            g, q = run["gallery"], run["queries"]
            assert all(gallery.valid(m)[g].all() for m in gm) and all(qset.valid(m)[q].all() for m in qm)
            gl = np.array([code[c] for c in gallery.label[g]])
            e, e_labels = ev.entries({m: gallery.emb(m)[g] for m in gm}, gl)
            dists = [ev.numpy_distances(e, qset.emb(m)[q]) for m in qm]
            np.testing.assert_array_equal(run["pred"], ev.reference_predict(dists, e_labels, k, len(code)))
            checked += len(q)
    assert checked > 1000


def test_missing_modalities_are_excluded_and_counted(ev) -> None:
    es = ev.make_set(200, 4, seed=4)
    no_profile = np.zeros(len(es), bool)
    no_profile[::5] = True  # 40 particles have no profile
    es = EmbeddingSet(
        es.particle_id, es.label, es.domain, es.image_emb, es.image_valid, es.profile_emb, ~no_profile
    )
    result = run_protocol(
        es, None, ["I-I", "P-P", "I+P-I+P", "I-P"], [2], 3, 2, progress=False, keep_predictions=True
    )
    for combo in ("P-P", "I+P-I+P", "I-P"):
        cell = result.cell(combo, 2)
        for i, run in enumerate(cell.predictions):
            assert es.profile_valid[run["queries"]].all()
            # Queries + excluded queries = the labelled particles outside this cell's gallery.
            assert cell.n_queries[i] + cell.excluded_queries[i] == 200 - cell.gallery_size[i]
    assert result.cell("P-P", 2).excluded_gallery == [40, 40]
    assert result.cell("I-P", 2).excluded_gallery == [0, 0]
    assert result.cell("I-I", 2).excluded_queries == [0, 0]
    for run in result.cell("P-P", 2).predictions:
        assert es.profile_valid[run["gallery"]].all()


def test_image_only_embeddings_skip_profile_cells(ev) -> None:
    es = ev.make_set(100, 4, seed=5, profile=False)  # e.g. the DINO baseline
    result = run_protocol(es, None, ["I-I", "P-P", "I+P-I"], [2], 3, 2, progress=False)
    assert len(result.cell("I-I", 2).accuracy) == 2
    assert result.cell("P-P", 2).skipped == {"no eligible gallery particle": 2}
    assert math.isnan(result.cell("I+P-I", 2).mean())
    assert math.isnan(gallery_score(es, "P-P"))


def test_folds_are_stratified_and_disjoint(ev) -> None:
    es = ev.make_set(250, 5, seed=6)
    codes = np.array([int(c[-2:]) for c in es.label])
    fold = stratified_folds(codes, 5, seed=0)
    for c in range(5):
        counts = np.bincount(fold[codes == c], minlength=5)
        assert counts.max() - counts.min() <= 1
    sizes = np.bincount(fold, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    result = run_protocol(es, None, ["I-I"], [2], 3, 2, folds=5, progress=False, keep_predictions=True)
    runs = result.cell("I-I", 2).predictions
    assert len(runs) == 10  # 5 folds x 2 repeats
    for f in range(5):
        run = runs[2 * f]
        np.testing.assert_array_equal(run["queries"], np.flatnonzero(fold == f))  # fold f is queried
        assert (fold[run["gallery"]] != f).all()  # the gallery comes from the other folds
    with pytest.raises(ValueError, match="folds"):
        run_protocol(es, es, ["I-I"], [2], folds=5, progress=False)


def test_gallery_score_is_the_protocol_mean(ev) -> None:
    es = ev.make_set(200, 5, seed=7)
    expected = (
        run_protocol(es, None, ["I+P-I+P"], [4], 3, 3, seed=1, progress=False).cell("I+P-I+P", 4).mean()
    )
    assert gallery_score(es, "I+P-I+P", n=4, k=3, repeats=3, seed=1) == expected
    unlabelled = EmbeddingSet(
        es.particle_id,
        [None] * len(es),
        es.domain,
        es.image_emb,
        es.image_valid,
        es.profile_emb,
        es.profile_valid,
    )
    with pytest.raises(ValueError, match="labelled"):
        gallery_score(unlabelled)
