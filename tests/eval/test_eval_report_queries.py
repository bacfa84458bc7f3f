"""What the scores rest on, in the report: queries whose class has no gallery particle (always
errors; they cap accuracy) and, per n, the classes that have queries at all. Checked on small
hand-built sets against counts made here from the labels, independently of the protocol."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from xmodal.eval.embeddings import EmbeddingSet
from xmodal.eval.protocol import parse_combo, run_protocol
from xmodal.eval.report import markdown, write_report

SIZES = [1, 2, 4, 8, 16]
REPEATS = 3


def hand_set(counts: dict[str | None, int], seed: int, no_profile: tuple[str, ...] = ()) -> EmbeddingSet:
    """``counts[label]`` particles per label (None: unlabelled), random vectors; the particles of
    the classes in ``no_profile`` have no profile embedding."""
    labels = np.array([c for c, n in counts.items() for _ in range(n)], dtype=object)
    rng = np.random.default_rng(seed)
    n = len(labels)
    profile_valid = np.array([c not in no_profile for c in labels])
    return EmbeddingSet(
        particle_id=np.array([f"{seed}:{i}" for i in range(n)], dtype=object),
        label=labels,
        domain=np.full(n, "X", dtype=object),
        image_emb=rng.normal(size=(n, 8)),
        image_valid=np.ones(n, bool),
        profile_emb=np.where(profile_valid[:, None], rng.normal(size=(n, 8)), 0.0),
        profile_valid=profile_valid,
    )


def test_split_mode_reports_queries_of_classes_absent_from_the_gallery(tmp_path: Path) -> None:
    # gallery: no D or E at all, and B without profiles (so absent from galleries that need them)
    gallery = hand_set({"A": 6, "B": 4, "C": 3, None: 2}, seed=1, no_profile=("B",))
    queries = hand_set({"A": 5, "B": 3, "C": 2, "D": 4, "E": 1, None: 1}, seed=2)
    result = run_protocol(gallery, queries, gallery_sizes=[1, 4], k=3, repeats=REPEATS, progress=False)
    q_labels = [c for c in queries.label if c is not None]
    md = markdown(result)
    for combo in result.combos:
        gmods, _ = parse_combo(combo)
        # independent count: the classes having a gallery particle with every modality the combo needs
        ok = np.logical_and.reduce([gallery.valid(m) for m in gmods])
        in_gallery = {c for c, good in zip(gallery.label, ok) if c is not None and good}
        lost = Counter(c for c in q_labels if c not in in_gallery)
        for n in (1, 4):
            cell = result.cell(combo, n)
            assert cell.unreachable_queries == [sum(lost.values())] * REPEATS
            assert cell.n_queries == [len(q_labels)] * REPEATS
            assert cell.ceiling() == pytest.approx([1 - sum(lost.values()) / len(q_labels)] * REPEATS)
            assert all(a <= c + 1e-12 for a, c in zip(cell.accuracy, cell.ceiling()))  # scores unchanged
            pooled = dict(zip(result.classes, cell.unreachable_by_class))
            assert {c: u for c, u in pooled.items() if u} == {c: REPEATS * v for c, v in lost.items()}
            for c in lost:  # never predicted right
                i = result.classes.index(c)
                assert cell.confusion[i, i] == 0
    assert result.cell("I-I", 1).unreachable_queries[0] == 5  # D 4 + E 1 of 15
    assert result.cell("P-P", 1).unreachable_queries[0] == 8  # and B 3 without gallery profiles
    assert "5 of 15 queries per run are of classes with no gallery particle (D 4, E 1)" in md
    assert "8 of 15 queries per run are of classes with no gallery particle (B 3, D 4, E 1)" in md
    assert "accuracy is at most 66.7 % at every n" in md and "accuracy is at most 46.7 % at every n" in md
    i_line = next(line for line in md.splitlines() if "(D 4, E 1)" in line)
    assert i_line.startswith("- I-I, I-P, I-I+P: ")
    # the header, next to the class count: the set-level count (D and E: no gallery particle at all)
    assert "5 classes (3 in the gallery set, 5 among the queries)" in md
    assert "5 of 15 queries are of classes absent from the gallery set" in md and "≤ 66.7 %" in md
    assert "- classes with queries (of 5): n=1: 5, n=4: 5\n" in md
    counts = result.counts
    assert (counts["gallery_classes"], counts["query_classes"], counts["queries_class_not_in_gallery"]) == (
        3,
        5,
        5,
    )
    cells = json.loads(write_report(result, tmp_path)["json"].read_text())["results"][0]["cells"]
    c = next(c for c in cells if c["combo"] == "P-P" and c["n"] == 4)
    assert c["unreachable_queries"] == [8] * REPEATS and c["query_classes"] == [5] * REPEATS
    assert c["accuracy_ceiling"]["mean"] == pytest.approx(7 / 15)
    assert c["unreachable_by_class"] == {"B": 3 * REPEATS, "D": 4 * REPEATS, "E": REPEATS}


def test_single_mode_reports_the_classes_with_queries_per_n() -> None:
    sizes = {"A": 20, "B": 9, "C": 4, "D": 2, "E": 1}
    es = hand_set({**sizes, None: 3}, seed=3)
    result = run_protocol(es, None, gallery_sizes=SIZES, k=3, repeats=REPEATS, progress=False)
    # independent count: a class keeps queries at n only if it has more than n particles
    expected = {
        n: sum(count > n for count in Counter(c for c in es.label if c is not None).values()) for n in SIZES
    }
    assert expected == {1: 4, 2: 3, 4: 2, 8: 2, 16: 1}
    for combo in result.combos:
        for n in SIZES:
            cell = result.cell(combo, n)
            assert cell.query_classes == [expected[n]] * REPEATS
            assert cell.unreachable_queries == [0] * REPEATS  # every class is in its own gallery
    md = markdown(result)
    assert (
        "- classes with queries (of 5): n=1: 4, n=2: 3, n=4: 2, n=8: 2, n=16: 1; they differ between n" in md
    )
    assert "no gallery particle" not in md


def test_folds_count_the_class_whose_only_particle_is_queried() -> None:
    """Single mode with folds: E's one particle is a query in one fold per repeat, with no E in the
    gallery folds; D's two particles are dealt to different folds, so D is always reachable."""
    es = hand_set({"A": 10, "B": 6, "D": 2, "E": 1}, seed=4)
    result = run_protocol(es, None, ["I-I"], [1, 2], k=1, repeats=REPEATS, folds=2, progress=False)
    for n in (1, 2):
        cell = result.cell("I-I", n)
        assert sum(cell.unreachable_queries) == REPEATS and sorted(set(cell.unreachable_queries)) == [0, 1]
        lost = dict(zip(result.classes, cell.unreachable_by_class))
        assert lost == {"A": 0, "B": 0, "D": 0, "E": REPEATS}
    assert (
        "- every combination: 0.5 of 9.5 queries per run are of classes with no gallery particle (E 0.5)"
        in markdown(result)
    )
