"""Index build / save / load / search: exact search equals brute force, approximate indexes reach
recall@10 >= 0.95 at their recorded settings on fresh queries, files round-trip."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from xmodal.config import ConfigError
from xmodal.data.quarantine import DataError
from xmodal.eval.embeddings import EmbeddingSet, load_embeddings, write_embeddings
from xmodal.index.build import BuildOptions, build_index, recall_at_k
from xmodal.index.search import RESULT_SCHEMA, search_embeddings, search_ids, search_index, write_results
from xmodal.index.store import load_index, save_index


def _labels(n: int) -> list[str]:
    return [f"sp{c:02d}" for c in range(n)]


def _check_against_brute(ix, stored, frame: pd.DataFrame, query_ids, queries, valid, k, exclude=None) -> None:
    rows = np.stack([stored.index.reconstruct(i) for i in range(stored.index.ntotal)])
    expected = ix.brute_neighbours(rows, stored.ids.particle, queries, valid, k, exclude)
    pid_of = {int(p): pid for p, pid in zip(stored.ids.particle, stored.ids.particle_id)}
    for qid, exp in zip(query_ids, expected):
        got = frame[frame["query_id"] == qid].sort_values("rank")
        assert got["neighbour_id"].tolist() == [pid_of[p] for p, _ in exp]
        np.testing.assert_allclose(got["score"].to_numpy(), [s for _, s in exp], atol=1e-5)


def test_exact_fused_index_round_trips_and_equals_brute_force(ix, tmp_path) -> None:
    centre = ix.centres(12, 24, seed=1)
    es = ix.clustered_set(centre, _labels(12), per_class=25, noise=1.0, seed=2, prefix="G", missing_image=7)
    ix.write_shards(es, tmp_path / "emb", shards=3)
    meta = build_index(tmp_path / "emb", tmp_path / "idx", BuildOptions(kind="fused"))
    assert meta["index_type"] == "flat" and meta["recall_at_10"] == 1.0
    assert meta["count"] == 2 * 300 - 7 and meta["particles"] == 300 and meta["dim"] == 24

    stored = load_index(tmp_path / "idx")
    assert isinstance(stored.index, faiss.IndexFlatIP) and stored.index.ntotal == meta["count"]
    ids = pd.read_parquet(tmp_path / "idx" / "ids.parquet")  # plain Parquet, readable by pandas
    assert (ids.groupby("particle_id")["modality"].count().max()) == 2
    # the stored rows are the unit embeddings, image rows then profile rows per shard
    first = ids[(ids.particle_id == "G3") & (ids.modality == "profile")].index[0]
    np.testing.assert_allclose(stored.index.reconstruct(int(first)), es.profile_emb[3], atol=1e-6)

    # saved again and reloaded: same rows, ids and meta (FAISS's own format, no pickle)
    save_index(tmp_path / "copy", stored.index, stored.ids.table(), {k: v for k, v in meta.items()})
    again = load_index(tmp_path / "copy")
    np.testing.assert_array_equal(
        faiss.rev_swig_ptr(again.index.get_xb(), again.index.ntotal * 24),
        faiss.rev_swig_ptr(stored.index.get_xb(), stored.index.ntotal * 24),
    )
    assert again.ids.particle_id.tolist() == stored.ids.particle_id.tolist()
    assert json.loads((tmp_path / "copy" / "meta.json").read_text())["count"] == meta["count"]

    # by id: both stored vectors of the particle, itself left out
    query_ids = ["G0", "G5", "G101", "G299"]
    frame = search_ids(tmp_path / "idx", query_ids, k=6)
    pos = [int(p[1:]) for p in query_ids]
    _check_against_brute(
        ix,
        stored,
        frame,
        query_ids,
        [es.image_emb[pos], es.profile_emb[pos]],
        [es.image_valid[pos], es.profile_valid[pos]],
        6,
        exclude=np.array(pos),
    )
    assert not (frame["query_id"] == frame["neighbour_id"]).any()

    # new particles: image query only against the fused rows
    new = ix.clustered_set(centre, _labels(12), per_class=2, noise=1.0, seed=3, prefix="Q")
    write_embeddings(new, tmp_path / "new")
    frame = pd.concat(search_embeddings(tmp_path / "idx", tmp_path / "new", k=5, query_kind="image"))
    _check_against_brute(ix, stored, frame, new.particle_id, [new.image_emb], [new.image_valid], 5)
    assert set(frame["label"]) <= set(_labels(12))

    with pytest.raises(ConfigError, match="not in the index"):
        search_ids(tmp_path / "idx", ["G0", "nope"], k=3)
    with pytest.raises(ConfigError, match="--k 0"):
        search_ids(tmp_path / "idx", ["G0"], k=0)


@pytest.mark.parametrize("approx", ["ivf-flat", "hnsw"])
def test_approximate_index_recall_at_recorded_settings(ix, tmp_path, approx: str) -> None:
    centre = ix.centres(60, 32, seed=4)
    es = ix.clustered_set(centre, _labels(60), per_class=80, noise=1.2, seed=5, prefix="A")
    ix.write_shards(es, tmp_path / "emb", shards=4)
    meta = build_index(
        tmp_path / "emb",
        tmp_path / "idx",
        BuildOptions(kind="image", exact_max=0, approx=approx, holdout=300, seed=0),
    )
    assert meta["index_type"] == approx and meta["count"] == 4800
    assert meta["recall_at_10"] >= meta["target_recall"] and meta["recall_holdout"] == 300
    param = "nprobe" if approx == "ivf-flat" else "efSearch"
    assert param in meta["search_param"] and meta["recall_curve"][-1][param] == meta["search_param"][param]
    if approx == "ivf-flat":  # lists: 4 sqrt(rows), at most one per 39 rows left after the held-out
        assert (
            meta["params"]["nlist"] == min(round(4 * np.sqrt(4800)), (4800 - 300) // 39)
            and meta["params"]["train_size"] >= 39 * meta["params"]["nlist"]
        )

    # fresh queries, exact top-10 by numpy, the loaded index at its recorded setting
    stored = load_index(tmp_path / "idx")
    fresh = ix.clustered_set(centre, _labels(60), per_class=5, noise=1.2, seed=6, prefix="F").image_emb
    exact = np.argsort(-(fresh.astype(np.float64) @ es.image_emb.T.astype(np.float64)), axis=1)[:, :10]
    _, found = search_index(stored).search(fresh, 10)
    hits = np.mean([len(np.intersect1d(f, e)) / 10 for f, e in zip(found, exact)])
    assert hits >= 0.95, f"{approx} recall@10 {hits:.3f} at {meta['search_param']}"


def test_ivf_pq_builds_reports_recall_and_round_trips(ix, tmp_path) -> None:
    centre = ix.centres(20, 16, seed=7)
    es = ix.clustered_set(centre, _labels(20), per_class=60, noise=1.0, seed=8, prefix="P")
    ix.write_shards(es, tmp_path / "emb", shards=2)
    meta = build_index(
        tmp_path / "emb",
        tmp_path / "idx",
        BuildOptions(kind="profile", exact_max=0, approx="ivf-pq", nlist=16, pq_m=8, holdout=100),
    )
    assert meta["factory"] == "IVF16,PQ8x8np" and meta["params"]["pq_m"] == 8
    assert 0 < meta["recall_at_10"] <= 1 and meta["recall_curve"]
    stored = load_index(tmp_path / "idx")
    assert isinstance(faiss.downcast_index(faiss.extract_index_ivf(stored.index)), faiss.IndexIVFPQ)
    assert faiss.extract_index_ivf(stored.index).nprobe == meta["search_param"]["nprobe"]


def test_recall_at_k_leaves_the_query_out() -> None:
    exact = np.array([[7, 1, 2, 3], [4, 5, 6, 8]])
    found = np.array([[1, 7, 9, 2], [5, 4, -1, -1]])
    # query 0 is row 7: exact {1, 2} (k=2) vs found {1, 9}; query 1 is row 99: {4, 5} vs {5, 4}
    assert recall_at_k(found, exact, np.array([7, 99]), k=2) == pytest.approx((0.5 + 1.0) / 2)


def test_build_refuses_duplicate_particles_and_unknown_kinds(ix, tmp_path) -> None:
    es = ix.clustered_set(ix.centres(3, 8, seed=9), _labels(3), per_class=4, noise=0.5, seed=10, prefix="D")
    write_embeddings(es, tmp_path / "emb")
    write_embeddings(es.subset(np.arange(2)), tmp_path / "emb")
    with pytest.raises(DataError, match="more than one shard"):
        build_index(tmp_path / "emb", tmp_path / "idx")
    assert load_embeddings(tmp_path / "emb" / "part-00000.parquet") is not None
    with pytest.raises(ConfigError, match="unknown embedding kind"):
        build_index(tmp_path / "emb" / "part-00000.parquet", tmp_path / "idx", BuildOptions(kind="both"))


def test_ivf_on_small_data_keeps_rows_to_train_on(ix, tmp_path) -> None:
    """510 particles (1,020 fused rows) used to hold out 1,000 rows and train 26 lists on 20. Now
    the held-out queries leave 39 rows per list (256 for PQ); searched exhaustively (nprobe = nlist)
    the index equals brute force; what cannot be trained says which option to change."""
    centre = ix.centres(5, 16, seed=20)
    es = ix.clustered_set(centre, _labels(5), per_class=102, noise=1.0, seed=21, prefix="S")
    write_embeddings(es, tmp_path / "emb")
    for approx in ("ivf-flat", "ivf-pq"):
        meta = build_index(tmp_path / "emb", tmp_path / approx, BuildOptions(exact_max=0, approx=approx))
        nlist, train = meta["params"]["nlist"], meta["params"]["train_size"]
        assert (
            train >= max(39 * nlist, 256 if approx == "ivf-pq" else 0)
            and train + meta["recall_holdout"] <= 1020
        )
        assert meta["recall_holdout"] >= 200 and meta["recall_curve"]
    stored = load_index(tmp_path / "ivf-flat")
    faiss.extract_index_ivf(stored.index).nprobe = stored.meta["params"]["nlist"]
    fresh = ix.clustered_set(centre, _labels(5), per_class=4, noise=1.0, seed=22, prefix="F").image_emb
    rows = np.stack([stored.index.reconstruct(i) for i in range(stored.index.ntotal)]).astype(np.float64)
    exact = np.sort(-(fresh.astype(np.float64) @ rows.T), axis=1)[:, :10]
    sims, _ = stored.index.search(fresh, 10)
    np.testing.assert_allclose(sims, -exact, atol=1e-5)

    tiny = tmp_path / "tiny"
    write_embeddings(es.subset(np.arange(30)), tiny)  # 60 rows: one list, trained on 39 of them
    meta = build_index(tiny, tmp_path / "tiny_idx", BuildOptions(exact_max=0))
    assert meta["params"]["train_size"] == 39 and meta["recall_holdout"] == 21
    with pytest.raises(ConfigError, match="256 for the PQ codebooks.*--exact-max to 60"):
        build_index(tiny, tmp_path / "x", BuildOptions(exact_max=0, approx="ivf-pq"))
    with pytest.raises(ConfigError, match="lower --nlist to at most 26"):
        build_index(tmp_path / "emb", tmp_path / "x", BuildOptions(exact_max=0, nlist=2000))
    # a train_size below 39 per list is raised to it (the sample is drawn that large), not refused
    meta = build_index(
        tmp_path / "emb", tmp_path / "small_train", BuildOptions(exact_max=0, nlist=8, train_size=50)
    )
    assert meta["params"]["train_size"] == 39 * 8


def test_parquet_results_have_one_schema(ix, tmp_path) -> None:
    """The first shard's neighbours are all unlabelled (an all-null label column): the file is
    still typed by RESULT_SCHEMA and holds every shard's lines, equal to brute force."""
    centre = ix.centres(2, 16, seed=30) * 5
    lab = ix.clustered_set(centre[:1], ["diatom"], per_class=20, noise=0.5, seed=31, prefix="L")
    uto = ix.clustered_set(centre[1:], [None], per_class=20, noise=0.5, seed=32, prefix="U", domain="UTO")
    write_embeddings(EmbeddingSet.concat([lab, uto]), tmp_path / "emb")
    build_index(tmp_path / "emb", tmp_path / "idx")
    near_uto = ix.clustered_set(centre[1:], [None], per_class=3, noise=0.5, seed=33, prefix="q")
    near_lab = ix.clustered_set(centre[:1], [None], per_class=3, noise=0.5, seed=34, prefix="r")
    write_embeddings(near_uto, tmp_path / "q")
    write_embeddings(near_lab, tmp_path / "q")
    lines = write_results(search_embeddings(tmp_path / "idx", tmp_path / "q", k=4), tmp_path / "hits.parquet")
    table = pq.read_table(tmp_path / "hits.parquet")
    assert lines == 24 and table.schema == RESULT_SCHEMA
    hits = table.to_pandas()
    assert hits["label"].iloc[:12].isna().all() and (hits["label"].iloc[12:] == "diatom").all()
    q = EmbeddingSet.concat([near_uto, near_lab])
    _check_against_brute(
        ix, load_index(tmp_path / "idx"), hits, q.particle_id, [q.image_emb, q.profile_emb],
        [q.image_valid, q.profile_valid], 4,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="--out .*txt: name a .csv or .parquet"):
        write_results([], tmp_path / "hits.txt")


def test_search_skips_a_modality_no_row_has(ix, tmp_path) -> None:
    """An image-only (DINO) index searched with the default fused queries, and a query shard
    without profiles against a fused index, equal brute force over the vectors they have; a
    query of another width is refused with the reason."""
    centre = ix.centres(3, 16, seed=36)
    gallery = ix.clustered_set(centre, _labels(3), per_class=10, noise=1.0, seed=37, prefix="G")
    queries = ix.image_only(ix.clustered_set(centre, [None] * 3, per_class=2, noise=1.0, seed=38, prefix="Q"))
    write_embeddings(queries, tmp_path / "q")
    write_embeddings(ix.image_only(gallery), tmp_path / "dino")
    write_embeddings(gallery, tmp_path / "clip")
    for name in ("dino", "clip"):
        build_index(tmp_path / name, tmp_path / f"{name}_idx")
        hits = pd.concat(search_embeddings(tmp_path / f"{name}_idx", tmp_path / "q", k=5))
        stored = load_index(tmp_path / f"{name}_idx")
        assert stored.kind == "fused" and len(hits) == 6 * 5
        _check_against_brute(
            ix, stored, hits, queries.particle_id, [queries.image_emb], [queries.image_valid], 5
        )

    narrow = EmbeddingSet(["n0"], [None], ["X"], np.ones((1, 8)), np.ones(1, bool), None, np.zeros(1, bool))
    write_embeddings(narrow, tmp_path / "narrow")
    with pytest.raises(DataError, match="8 wide but the index .* 16-wide"):
        list(search_embeddings(tmp_path / "dino_idx", tmp_path / "narrow", k=3))


def test_search_ids_lists_a_repeated_id_each_time(ix, tmp_path) -> None:
    """``--ids A B A``: three lists in the order given, each equal to brute force."""
    es = ix.clustered_set(
        ix.centres(4, 16, seed=40), _labels(4), per_class=10, noise=1.0, seed=41, prefix="G"
    )
    write_embeddings(es, tmp_path / "emb")
    build_index(tmp_path / "emb", tmp_path / "idx")
    stored = load_index(tmp_path / "idx")
    twice = ["G5", "G0", "G5"]
    frame = search_ids(tmp_path / "idx", twice, k=4)
    assert frame["query_id"].tolist() == [q for q in twice for _ in range(4)]
    for i, p in enumerate(int(q[1:]) for q in twice):
        _check_against_brute(
            ix, stored, frame.iloc[4 * i : 4 * i + 4], [twice[i]], [es.image_emb[[p]], es.profile_emb[[p]]],
            [es.image_valid[[p]], es.profile_valid[[p]]], 4, exclude=np.array([p]),
        )  # fmt: skip
