"""FAISS k-NN with the paper's vote equals a plain float64 numpy implementation and scikit-learn's
NearestNeighbors(metric="cosine"), on random and on tied data, for all nine combinations."""

from __future__ import annotations

import numpy as np
import pytest

import xmodal.eval.knn as knn
from xmodal.eval.knn import exact_predict, exact_search, faiss_search, knn_predict, l2_normalize
from xmodal.eval.protocol import COMBOS, parse_combo


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(rng: np.random.Generator, n_classes: int, g: int, q: int, spread: float, d: int = 24):
    """Random unit embeddings around class centres: (gallery by modality, gallery labels, queries by
    modality, query labels)."""
    labels = rng.integers(0, n_classes, g)
    centres = rng.normal(size=(n_classes, d))
    gal = {m: _unit(centres[labels] + spread * rng.normal(size=(g, d))) for m in ("image", "profile")}
    yq = rng.integers(0, n_classes, q)
    qry = {m: _unit(centres[yq] + spread * rng.normal(size=(q, d))) for m in ("image", "profile")}
    return gal, labels, qry, yq


def _check_all_paths(ev, gallery, labels, queries, k, n_classes) -> np.ndarray:
    fast = knn.knn_predict(gallery, labels, queries, k, n_classes)
    slow = exact_predict(gallery, labels, queries, k, n_classes)
    e, e_labels = ev.entries(gallery, labels)
    by_numpy = ev.reference_predict(
        [ev.numpy_distances(e, q) for q in queries.values()], e_labels, k, n_classes
    )
    by_sklearn = ev.reference_predict(
        [ev.sklearn_distances(e, q) for q in queries.values()], e_labels, k, n_classes
    )
    np.testing.assert_array_equal(fast, by_numpy)
    np.testing.assert_array_equal(fast, by_sklearn)
    np.testing.assert_array_equal(slow, by_numpy)
    return fast


def _count_float64_work(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """Query rows the FAISS path hands to float64, per call, while ``knn.knn_predict`` runs:
    re-ranked over the shortlist (``_rerank``), brute-forced (``exact_search``), and all float64
    similarity work (``_dots``: the re-ranks and the re-votes)."""
    rows: dict[str, list[int]] = {"_rerank": [], "exact_search": [], "_dots": []}
    active = [False]
    for name in rows:
        original = getattr(knn, name)

        def counting(gallery, queries, *args, _name=name, _original=original):
            if active[0]:
                rows[_name].append(len(queries))
            return _original(gallery, queries, *args)

        monkeypatch.setattr(knn, name, counting)
    predict = knn.knn_predict

    def fast_path(*args, **kwargs):
        active[0] = True
        try:
            return predict(*args, **kwargs)
        finally:
            active[0] = False

    monkeypatch.setattr(knn, "knn_predict", fast_path)
    return rows


@pytest.mark.parametrize("k", [1, 3, 5])
def test_random_data_all_combinations(ev, k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    work = _count_float64_work(monkeypatch)
    n_classes, q = 5, 150
    gal, labels, qry, yq = _clustered(np.random.default_rng(k), n_classes, 30, q, spread=1.5)
    for combo in COMBOS:
        gm, qm = parse_combo(combo)
        pred = _check_all_paths(ev, {m: gal[m] for m in gm}, labels, {m: qry[m] for m in qm}, k, n_classes)
        assert (pred == yq).mean() > 1.5 / n_classes  # the data carry signal, so the test is not vacuous
    # FAISS decides most rows; float64 only the doubtful.
    assert sum(work["_dots"]) + sum(work["exact_search"]) < 0.1 * q * len(COMBOS)


def test_tied_data_all_combinations(ev, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sign vectors of width 16 normalise to +-0.25 exactly, so every similarity is an exact multiple
    of 1/16 in any precision: many equal distances, duplicates with different labels, exact matches."""
    rng = np.random.default_rng(7)
    pool = rng.choice([-1.0, 1.0], size=(6, 16))
    n_classes, g = 4, 24
    labels = rng.integers(0, n_classes, g)
    gal = {m: _unit(pool[rng.integers(0, 6, g)]) for m in ("image", "profile")}
    queries = np.concatenate([pool[rng.integers(0, 6, 60)], rng.choice([-1.0, 1.0], size=(60, 16))])
    qry = {"image": _unit(queries), "profile": _unit(queries[::-1].copy())}
    work = _count_float64_work(monkeypatch)
    for k in (1, 3, 4):
        for combo in COMBOS:
            gm, qm = parse_combo(combo)
            _check_all_paths(ev, {m: gal[m] for m in gm}, labels, {m: qry[m] for m in qm}, k, n_classes)
    # Tied rows went through both float64 paths: the shortlist re-rank and, for tie groups longer
    # than the shortlist, brute force.
    assert work["_rerank"] and work["exact_search"]
    assert len(work["_dots"]) > len(work["_rerank"])  # and votes taken again over float64 similarities


def test_exact_match_takes_the_vote() -> None:
    # Query = e0. Gallery: one exact match of class 1, two exact matches of class 2, and a very close
    # (not exact) neighbour of class 1 whose 1/d weight alone would dwarf everything else.
    q = np.array([[1.0, 0.0, 0.0]])
    close = _unit(np.array([[1.0, 1e-4, 0.0]]))[0]
    gallery = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], close])
    labels = np.array([1, 2, 2, 1])
    assert knn_predict({"image": gallery}, labels, {"image": q}, 4, 3)[0] == 2
    assert exact_predict({"image": gallery}, labels, {"image": q}, 4, 3)[0] == 2
    # Without the exact matches, the close neighbour's weight wins against two farther ones.
    far = _unit(np.array([[1.0, 0.5, 0.0], [1.0, -0.5, 0.0]]))
    assert knn_predict({"image": np.vstack([far, close])}, np.array([2, 2, 1]), {"image": q}, 3, 3)[0] == 1


def test_equal_distance_at_kth_place_goes_to_lower_gallery_index() -> None:
    v = np.array([[0.6, 0.8]])
    q = _unit(np.array([[1.0, 0.5]]))
    # Same vector twice with different classes, k = 1: row 0 (class 1) is "nearer" than row 1 (class 0).
    assert knn_predict({"image": np.vstack([v, v])}, np.array([1, 0]), {"image": q}, 1, 2)[0] == 1
    # Gallery I+P: the image row of particle 0 comes before the profile row of particle 0.
    gal = {"image": np.vstack([v, [[0.0, 1.0]]]), "profile": np.vstack([v, [[1.0, 0.0]]])}
    labels = np.array([1, 0])
    assert knn_predict(gal, labels, {"image": v}, 1, 2)[0] == 1


def test_vote_tie_goes_to_smallest_class_code() -> None:
    q = np.array([[1.0, 0.0, 0.0]])
    gallery = np.array([[0.6, 0.8, 0.0], [0.6, -0.8, 0.0], [0.0, 0.0, 1.0]])
    # k = 2: classes 2 and 1 at the same distance 0.4 -> tie -> class 1.
    assert knn_predict({"image": gallery}, np.array([2, 1, 0]), {"image": q}, 2, 3)[0] == 1


def test_query_i_plus_p_pools_both_neighbour_lists() -> None:
    gallery = {"image": np.array([[1.0, 0.0], [0.0, 1.0]])}
    labels = np.array([0, 1])
    img_q = _unit(np.array([[1.0, 1.2]]))  # nearer class 1, with a small margin
    prof_q = np.array([[1.0, 0.0]])  # exactly class 0's entry
    img_only = knn_predict(gallery, labels, {"image": img_q}, 2, 2)
    pooled = knn_predict(gallery, labels, {"image": img_q, "profile": prof_q}, 2, 2)
    assert img_only[0] == 1
    assert pooled[0] == 0  # the profile query's exact match takes the pooled vote
    d_img = 1 - img_q[0] @ gallery["image"].T
    prof_soft = _unit(np.array([[1.0, 0.3]]))
    d_prof = 1 - prof_soft[0] @ gallery["image"].T
    votes = [1 / d_img[0] + 1 / d_prof[0], 1 / d_img[1] + 1 / d_prof[1]]
    soft = knn_predict(gallery, labels, {"image": img_q, "profile": prof_soft}, 2, 2)
    assert soft[0] == int(np.argmax(votes))


def test_k_larger_than_gallery_uses_whole_gallery() -> None:
    gallery = np.array([[1.0, 0.0], [0.0, 1.0]])
    q = _unit(np.array([[1.0, 0.9]]))
    assert knn_predict({"image": gallery}, np.array([0, 1]), {"image": q}, 10, 2)[0] == 0


def test_float32_rounding_is_refined_in_float64() -> None:
    """Two gallery rows equal in float32 but not in float64: FAISS sees a tie, the rule must not."""
    u = np.array([1.0, 0.0, 0.0, 0.0])
    nearer = _unit(np.array([[1.0, 1e-9, 0.0, 0.0]]))[0]
    q = _unit(np.array([[1.0, 0.5, 0.0, 0.0]]))
    for gallery, labels in (
        (np.vstack([u, nearer]), np.array([0, 1])),
        (np.vstack([nearer, u]), np.array([1, 0])),
    ):
        sims32, _ = faiss_search(gallery.astype(np.float32), q.astype(np.float32), 2)
        assert sims32[0, 0] == sims32[0, 1]  # the premise: float32 cannot tell them apart
        assert knn_predict({"image": gallery}, labels, {"image": q}, 1, 2)[0] == 1  # whichever row it is


def test_faiss_search_finds_the_exact_top_k() -> None:
    rng = np.random.default_rng(0)
    g, q = _unit(rng.normal(size=(200, 32))), _unit(rng.normal(size=(100, 32)))
    sims32, idx32 = faiss_search(g.astype(np.float32), q.astype(np.float32), 5)
    sims64, idx64 = exact_search(g, q, 5)
    np.testing.assert_array_equal(idx32, idx64)
    np.testing.assert_allclose(sims32, sims64, atol=1e-6)


def test_gpu_settings_give_the_same_predictions(ev, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a GPU, FAISS may compute in TF32: the tolerance is 2e-3 and shortlists are wider. The
    index is moved by ``index_cpu_to_all_gpus``; here it stays on the CPU (no GPU in CI), so what is
    checked is the certification under the GPU tolerance: far more rows are doubtful, and every
    prediction still equals the float64 reference."""
    import faiss

    monkeypatch.setattr(knn, "use_gpu", lambda: True)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda index: index)
    work = _count_float64_work(monkeypatch)
    assert knn.similarity_tolerance(24) == knn.GPU_SIM_TOLERANCE
    assert knn.shortlist_width(3, 1000) == 3 + 1 + knn.SHORTLIST_EXTRA_GPU
    n_classes = 4
    gal, labels, qry, _ = _clustered(np.random.default_rng(5), n_classes, 60, 200, spread=2.0)
    for combo in ("I-I", "I+P-P", "I+P-I+P"):
        gm, qm = parse_combo(combo)
        _check_all_paths(ev, {m: gal[m] for m in gm}, labels, {m: qry[m] for m in qm}, 3, n_classes)
    assert sum(work["_rerank"]) > 0  # the wide tolerance sent rows to float64


def test_l2_normalize_rejects_zero_rows() -> None:
    with pytest.raises(ValueError, match="zero norm.*row 1"):
        l2_normalize(np.array([[1.0, 0.0], [0.0, 0.0]]), "gallery image embeddings")


def test_exact_match_is_decided_in_float64() -> None:
    """An exact match next to two neighbours 1e-4 rad away (cosine distance 5e-9, above
    EXACT_DISTANCE): in float32 all three have similarity 1 (2 votes to 1 for the neighbours'
    class); in float64 only the exact match is exact, and it takes the vote."""
    rng = np.random.default_rng(3)
    q = _unit(rng.normal(size=(1, 64)))
    near = _unit(q + 1e-4 * _unit(rng.normal(size=(2, 64))))
    gallery = np.vstack([q, near])
    labels = np.array([1, 0, 0])
    assert (1 - near @ q[0] > knn.EXACT_DISTANCE).all()
    assert exact_predict({"image": gallery}, labels, {"image": q}, 3, 2)[0] == 1
    assert knn_predict({"image": gallery}, labels, {"image": q}, 3, 2)[0] == 1
