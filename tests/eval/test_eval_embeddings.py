"""EmbeddingSet and its Parquet form: round trips, shards, missing modalities, bad input, particles
given for embeddings, and the checkpoint each set records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xmodal.data.quarantine import DataError
from xmodal.eval.embeddings import (
    Checkpoint,
    EmbeddingSet,
    check_same_checkpoint,
    embeddings_checkpoint,
    load_embeddings,
    write_embeddings,
)


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


def _particles(folder: Path) -> Path:
    """A shard as `xmodal ingest` writes particles: ids, labels and the raw image / profile."""
    folder.mkdir(parents=True)
    table = pa.table(
        {
            "particle_id": ["a", "b"],
            "label": ["x", None],
            "domain": ["LAB", "LAB"],
            "image": [b"\x89PNG", None],
            "profile": pa.array([[1.0, 2.0], [3.0, 4.0]], type=pa.list_(pa.float32())),
        }
    )
    pq.write_table(table, folder / "part-00000.parquet")
    return folder


def test_a_particle_folder_is_not_read_as_embeddings(tmp_path: Path) -> None:
    data = _particles(tmp_path / "data" / "SEA")
    fix = rf"{data} holds particles, not embeddings.*run `xmodal embed --checkpoint RUN --data {data} --out OUT`"
    with pytest.raises(DataError, match=fix):
        load_embeddings(data)
    with pytest.raises(DataError, match="holds particles, not embeddings"):
        load_embeddings(data / "part-00000.parquet")
    with pytest.raises(DataError, match="holds particles"):
        embeddings_checkpoint(data)


CK1, CK2 = "/runs/r1/checkpoint_1/checkpoint.pt", "/runs/r1/checkpoint_2/checkpoint.pt"


def _check(first: Path, second: Path) -> None:
    check_same_checkpoint(first, embeddings_checkpoint(first), second, embeddings_checkpoint(second))


def test_checkpoints_are_recorded_and_compared(ev, tmp_path: Path) -> None:
    lab, sea = ev.make_set(10, 2, seed=1, domain="LAB"), ev.make_set(10, 2, seed=2, domain="SEA")
    write_embeddings(lab, tmp_path / "lab", checkpoint=CK1)
    empty = lab.subset(np.zeros(10, bool))
    write_embeddings(empty, tmp_path / "lab")  # an empty input shard's output records none
    write_embeddings(sea, tmp_path / "sea", checkpoint=CK2)
    write_embeddings(sea, tmp_path / "sea1", checkpoint=CK1)
    write_embeddings(sea, tmp_path / "old")  # written before checkpoints were recorded
    assert embeddings_checkpoint(tmp_path / "lab") == Checkpoint(CK1)
    assert embeddings_checkpoint(tmp_path / "old") is None
    with pytest.raises(DataError, match=rf"lab holds embeddings of checkpoint {CK1} but .*sea of {CK2}.*"
                       "embed both with the same checkpoint"):  # fmt: skip
        _check(tmp_path / "lab", tmp_path / "sea")
    _check(tmp_path / "lab", tmp_path / "sea1")
    _check(tmp_path / "lab", tmp_path / "old")  # nothing recorded: nothing to compare
    _check(tmp_path / "old", tmp_path / "sea")

    # the manifest's hash identifies the file: the same model wherever it lies, another one in its place
    (tmp_path / "lab" / "_embed.json").write_text(json.dumps({"checkpoint": CK1, "checkpoint_sha256": "aa"}))
    write_embeddings(sea, tmp_path / "moved", checkpoint="/mnt/copy/checkpoint.pt")
    (tmp_path / "moved" / "embed.json").write_text(  # the manifest's older name
        json.dumps({"checkpoint": "/mnt/copy/checkpoint.pt", "checkpoint_sha256": "aa"})
    )
    _check(tmp_path / "lab", tmp_path / "moved")
    write_embeddings(sea, tmp_path / "retrained", checkpoint=CK1)
    (tmp_path / "retrained" / "_embed.json").write_text(
        json.dumps({"checkpoint": CK1, "checkpoint_sha256": "bb"})
    )
    with pytest.raises(DataError, match="not comparable"):
        _check(tmp_path / "lab", tmp_path / "retrained")


def test_a_shard_file_reads_its_folders_manifest_and_a_missing_hash_only_warns(
    ev, tmp_path: Path, capsys
) -> None:
    """One model stored at two paths: a shard FILE of the copy is its folder's model (the folder's
    manifest names the shard's checkpoint, with its hash). A side without a hash (an index or
    embeddings from before hashes were recorded) and another path: cannot tell, a warning."""
    lab, sea = ev.make_set(10, 2, seed=1, domain="LAB"), ev.make_set(10, 2, seed=2, domain="SEA")
    write_embeddings(lab, tmp_path / "gal", checkpoint=CK1)
    (tmp_path / "gal" / "_embed.json").write_text(json.dumps({"checkpoint": CK1, "checkpoint_sha256": "aa"}))
    copy = "/mnt/copy/r1/checkpoint_1/checkpoint.pt"
    shard = write_embeddings(sea, tmp_path / "qry", checkpoint=copy)
    (tmp_path / "qry" / "_embed.json").write_text(json.dumps({"checkpoint": copy, "checkpoint_sha256": "aa"}))
    assert shard.is_file() and embeddings_checkpoint(shard) == Checkpoint(copy, "aa")
    _check(tmp_path / "gal", shard)
    _check(tmp_path / "gal", tmp_path / "qry")
    assert capsys.readouterr().err == ""
    # a manifest naming another checkpoint than the shard's says nothing about the shard
    (tmp_path / "qry" / "_embed.json").write_text(json.dumps({"checkpoint": CK2, "checkpoint_sha256": "aa"}))
    assert embeddings_checkpoint(shard) == Checkpoint(copy)
    # a hash on one side only, different paths: no error, one warning line naming both
    _check(tmp_path / "gal", shard)
    (warning,) = capsys.readouterr().err.splitlines()
    assert warning.startswith("warning: cannot tell whether")
    assert f"{tmp_path / 'gal'} (checkpoint {CK1})" in warning and f"{shard} (checkpoint {copy})" in warning
    check_same_checkpoint("idx", Checkpoint(CK1), "q", Checkpoint(CK1, "aa"))  # same path: same file
    assert capsys.readouterr().err == ""
    with pytest.raises(DataError, match="not comparable"):  # hashes on both sides decide
        check_same_checkpoint("idx", Checkpoint(CK1, "aa"), "q", Checkpoint(CK1, "bb"))


def test_a_set_whose_shards_come_from_different_checkpoints_is_refused(ev, tmp_path: Path) -> None:
    write_embeddings(ev.make_set(10, 2, seed=1, domain="LAB"), tmp_path / "emb" / "lab", checkpoint=CK1)
    write_embeddings(ev.make_set(10, 2, seed=2, domain="SEA"), tmp_path / "emb" / "sea", checkpoint=CK2)
    with pytest.raises(DataError, match=rf"emb mixes embeddings of 2 checkpoints .*{CK1}.*{CK2}"):
        load_embeddings(tmp_path / "emb")  # two `xmodal embed` outputs read as one set
    assert len(load_embeddings(tmp_path / "emb" / "lab")) == 10
