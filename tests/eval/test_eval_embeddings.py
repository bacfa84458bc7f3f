"""EmbeddingSet and its Parquet form: round trips, shards, missing modalities, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xmodal.eval.embeddings import EmbeddingSet, load_embeddings, write_embeddings


def _assert_same(a: EmbeddingSet, b: EmbeddingSet, atol: float = 0.0) -> None:
    assert a.particle_id.tolist() == b.particle_id.tolist()
    assert a.label.tolist() == b.label.tolist()
    assert a.domain.tolist() == b.domain.tolist()
    for m in ("image", "profile"):
        np.testing.assert_array_equal(a.valid(m), b.valid(m))
        np.testing.assert_allclose(a.emb(m)[a.valid(m)], b.emb(m)[b.valid(m)], atol=atol)


def test_round_trip_float32_exact_and_float16_close(ev, tmp_path: Path) -> None:
    es = ev.make_set(50, 3, dim=8, unlabelled=5)
    es.profile_valid[[3, 7]] = False  # particles without a profile
    es.image_valid[9] = False
    write_embeddings(es, tmp_path / "f32")
    _assert_same(es, load_embeddings(tmp_path / "f32"))
    write_embeddings(es, tmp_path / "f16", float16=True)
    table = pq.read_table(tmp_path / "f16")
    assert table.schema.field("image_emb").type == pa.list_(pa.float16())
    assert table.column("profile_emb").null_count == 2
    assert table.column("label").null_count == 5
    back = load_embeddings(tmp_path / "f16")
    assert back.image_emb.dtype == np.float32
    _assert_same(es, back, atol=5e-3)


def test_repeated_writes_append_shards(ev, tmp_path: Path) -> None:
    a, b = ev.make_set(20, 2, seed=1, domain="LAB"), ev.make_set(30, 2, seed=2, domain="SEA")
    paths = [write_embeddings(a, tmp_path), write_embeddings(b, tmp_path)]
    assert [p.name for p in paths] == ["part-00000.parquet", "part-00001.parquet"]
    _assert_same(EmbeddingSet.concat([a, b]), load_embeddings(tmp_path))
    write_embeddings(a, tmp_path)  # the same particles again: they would be their own exact matches
    with pytest.raises(ValueError, match="more than once"):
        load_embeddings(tmp_path)


def test_image_only_model_and_foreign_writers(tmp_path: Path) -> None:
    """A DINO-style set (no profile column values) and a file written by another tool (Ray Data
    names, fixed-size lists, a missing profile column) load with an empty profile modality."""
    emb = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    table = pa.table(
        {
            "particle_id": ["a", "b", "c"],
            "label": ["x", "unlabelled", None],
            "domain": ["LAB"] * 3,
            "image_emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 4),
        }
    )
    pq.write_table(table, tmp_path / "0f3a_000000_000000.parquet")
    es = load_embeddings(tmp_path)
    np.testing.assert_array_equal(es.image_emb, emb)
    assert es.profile_emb.shape == (3, 0) and not es.profile_valid.any()
    assert es.label.tolist() == ["x", None, None]
    assert es.labelled.tolist() == [True, False, False]


def test_subset_by_mask_and_index(ev) -> None:
    es = ev.make_set(10, 2)
    mask = np.zeros(10, bool)
    mask[[1, 4]] = True
    assert es.subset(mask).particle_id.tolist() == ["LAB:1", "LAB:4"]
    assert es.subset([4, 1]).particle_id.tolist() == ["LAB:4", "LAB:1"]
    np.testing.assert_array_equal(es.subset([4]).image_emb[0], es.image_emb[4])


def test_bad_input_is_reported(ev, tmp_path: Path) -> None:
    es = ev.make_set(5, 2)
    emb = es.image_emb.copy()
    emb[2, 0] = np.nan
    with pytest.raises(ValueError, match="NaN.*LAB:2"):
        EmbeddingSet(
            es.particle_id, es.label, es.domain, emb, es.image_valid, es.profile_emb, es.profile_valid
        )
    with pytest.raises(FileNotFoundError, match="xmodal embed"):
        load_embeddings(tmp_path / "nothing")
    ragged = pa.table(
        {
            "particle_id": ["a", "b"],
            "label": ["x", "y"],
            "domain": ["LAB", "LAB"],
            "image_emb": pa.array([[1.0, 2.0], [1.0, 2.0, 3.0]], type=pa.list_(pa.float32())),
        }
    )
    pq.write_table(ragged, tmp_path / "ragged.parquet")
    with pytest.raises(ValueError, match="ragged.parquet.*image_emb lengths differ"):
        load_embeddings(tmp_path / "ragged.parquet")
