"""Streaming ``embed``: one output shard per input shard, equal to in-process embedding; an
interrupted run keeps its finished shards and a rerun only embeds what is missing (also new shards
of a growing archive, and shards rewritten since); another model's or dataset's output folder, and
one inside the data, are refused; float16 output; model actors capped at what the cluster runs."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from xmodal.config import ConfigError, load_config
from xmodal.data.pipeline import table_to_model_batch
from xmodal.data.synth import synthesize
from xmodal.eval import embed as embed_mod
from xmodal.eval.embed import embed, embed_arrays, model_from_state
from xmodal.eval.embeddings import load_embeddings
from xmodal.index.build import CHECKPOINT_KEY
from xmodal.models.build import build_model
from xmodal.train.checkpoint import load_checkpoint, save_checkpoint

ROWS = 60
EXTRA = 10  # particles in none of the shards: a re-ingest adds them to one


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Five input shards (one in a sub-folder, one empty), EXTRA more particles (extra.parquet),
    and a random-weights tiny model."""
    root = tmp_path_factory.mktemp("archive")
    synthesize(root / "syn", n_lab=0, n_sea=0, n_uto=4 * ROWS + EXTRA, seed=0, fmt="parquet", image_size=24)
    table = pq.read_table(root / "syn" / "UTO")
    (root / "data" / "sub").mkdir(parents=True)
    names = ["part-00000.parquet", "part-00001.parquet", "sub/part-00002.parquet", "part-00003.parquet"]
    for i, name in enumerate(names):
        pq.write_table(table.slice(i * ROWS, ROWS), root / "data" / name)
    pq.write_table(table.slice(0, 0), root / "data" / "part-00004.parquet")
    pq.write_table(table.slice(4 * ROWS), root / "extra.parquet")
    cfg = load_config(None, ["data.image_size=24", "data.profile_length=32", "model.embed_dim=16"])
    torch.manual_seed(0)
    save_checkpoint(root / "ckpt", cfg, build_model(cfg), 0, 0)
    torch.manual_seed(1)
    save_checkpoint(root / "other", cfg, build_model(cfg), 0, 0)
    return root


def _in_process(ckpt, shard) -> dict[str, np.ndarray]:
    state = load_checkpoint(ckpt)
    table = pq.read_table(shard)
    batch = table_to_model_batch(table, 24, 32)
    return embed_arrays(model_from_state(state, torch.device("cpu")), batch, torch.device("cpu"))


def _read_as_dataset(out) -> int:
    """Rows of ``out`` read as one Parquet dataset by pyarrow and by pandas (they must agree)."""
    rows = ds.dataset(out, format="parquet").count_rows()
    assert len(pd.read_parquet(out)) == rows
    return rows


def _mtimes(out) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("*.parquet")}


@pytest.mark.slow
def test_embed_streams_resumes_and_grows(ray_session, archive, tmp_path, monkeypatch, capsys) -> None:
    torch.set_num_threads(1)
    data, out = tmp_path / "data", tmp_path / "emb"
    shutil.copytree(archive / "data", data)  # this test rewrites shards
    late = data / "part-00003.parquet"
    held_back = late.rename(tmp_path / "late.parquet")  # the archive grows later

    # run 1 is interrupted once a second shard has started streaming
    real_write = embed_mod._ShardOutputs.write

    def interrupting_write(self, source, table):
        if len(self.written) == 2 and source not in self.written:
            raise KeyboardInterrupt
        real_write(self, source, table)

    monkeypatch.setattr(embed_mod._ShardOutputs, "write", interrupting_write)
    with pytest.raises(KeyboardInterrupt):
        embed(archive / "ckpt", data, out, batch_size=16)
    monkeypatch.setattr(embed_mod._ShardOutputs, "write", real_write)
    finished = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet"))
    assert 1 <= len(finished) <= 2  # the empty shard and/or one real shard; nothing half-written
    for name in finished:
        assert pq.ParquetFile(out / name).metadata.num_rows == pq.ParquetFile(data / name).metadata.num_rows

    # run 2: resumes, and embeds the shard that arrived meanwhile
    held_back.rename(late)
    capsys.readouterr()
    embed(archive / "ckpt", data, out, batch_size=16)
    log = capsys.readouterr().out + capsys.readouterr().err
    assert f"{len(finished)} of 5 shards already embedded" in log
    assert not list(out.rglob("*.tmp"))
    for shard in data.rglob("*.parquet"):
        got = pq.read_table(out / shard.relative_to(data))
        assert got.column("particle_id").to_pylist() == pq.read_table(shard).column("particle_id").to_pylist()
        assert (
            got.schema.metadata[CHECKPOINT_KEY]
            == str((archive / "ckpt" / "checkpoint.pt").resolve()).encode()
        )
        if got.num_rows:
            expected = _in_process(archive / "ckpt", shard)
            for m in ("image", "profile"):
                np.testing.assert_allclose(
                    np.stack(got.column(f"{m}_emb").to_pylist()), expected[m], atol=1e-5
                )
    assert len(load_embeddings(out)) == 4 * ROWS
    assert _read_as_dataset(out) == 4 * ROWS  # the manifest does not break Parquet dataset readers
    assert embed_mod.CHECKPOINT_KEY == CHECKPOINT_KEY  # the key `xmodal index build` reads

    # run 3: a re-ingest rewrote two shards under their names, one with more rows, one with the
    # same rows (other bytes): only those are embedded again
    before = _mtimes(out)
    pq.write_table(pq.read_table(archive / "extra.parquet"), data / "part-00004.parquet")
    pq.write_table(
        pq.read_table(data / "part-00000.parquet"), data / "part-00000.parquet", compression="none"
    )
    capsys.readouterr()
    embed(archive / "ckpt", data, out, batch_size=16)
    log = capsys.readouterr().out
    assert "3 of 5 shards already embedded" in log and "2 shard(s) changed since they were embedded" in log
    after = _mtimes(out)
    assert sorted(name for name in before if before[name] != after[name]) == [
        "part-00000.parquet",
        "part-00004.parquet",
    ]
    for name in ("part-00000.parquet", "part-00004.parquet"):
        got = pq.read_table(out / name)
        expected = _in_process(archive / "ckpt", data / name)
        assert (
            got.column("particle_id").to_pylist()
            == pq.read_table(data / name).column("particle_id").to_pylist()
        )
        np.testing.assert_allclose(
            np.stack(got.column("image_emb").to_pylist()), expected["image"], atol=1e-5
        )
    assert len(load_embeddings(out)) == 4 * ROWS + EXTRA

    # run 4: nothing left to do (no Ray work)
    embed(archive / "ckpt", data, out)
    assert after == _mtimes(out)
    # refused before any work: another model; another dataset whose shards have the same names;
    # an --out inside --data (its outputs would be read as particles), or the other way round
    with pytest.raises(FileExistsError, match="--overwrite"):
        embed(archive / "other", data, out)
    other = tmp_path / "other_data"
    other.mkdir()
    shutil.copy(data / "part-00001.parquet", other / "part-00001.parquet")
    with pytest.raises(FileExistsError, match="belongs to another dataset"):
        embed(archive / "ckpt", other, out)
    with pytest.raises(ConfigError, match="overlap"):
        embed(archive / "ckpt", data, data / "emb")
    with pytest.raises(ConfigError, match="overlap"):
        embed(archive / "ckpt", out / "part-00001.parquet", out)
    assert after == _mtimes(out) and not (data / "emb").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)  # uncapped, 3 CPU actors on the 2-CPU cluster leave none to read: a hang
def test_float16_output_with_capped_actors(ray_session, archive, tmp_path, capsys) -> None:
    torch.set_num_threads(1)
    shard, out = archive / "data" / "part-00001.parquet", tmp_path / "emb16"
    capsys.readouterr()
    embed(archive / "ckpt", shard, out, batch_size=16, float16=True, actors=3)
    assert "3 model actors asked for; using 1" in capsys.readouterr().out
    assert pq.read_schema(out / shard.name).field("image_emb").type == pa.list_(pa.float16())
    got, expected = load_embeddings(out), _in_process(archive / "ckpt", shard)
    assert got.image_valid.all() and got.profile_valid.all()
    for m in ("image", "profile"):
        np.testing.assert_allclose(got.emb(m), expected[m], rtol=2e-3, atol=1e-6)  # float16: 11 bits


def test_manifest_of_a_run_that_wrote_nothing_does_not_block(archive, tmp_path) -> None:
    """A float16 run that failed before its first shard (it used to, always) may not lock --out."""
    ckpt, out = archive / "ckpt" / "checkpoint.pt", tmp_path / "emb"
    embed_mod._claim_output(out, ckpt, True, False)
    embed_mod._claim_output(out, ckpt, False, False)
    pq.write_table(embed_mod.output_schema(False, str(ckpt), "x").empty_table(), out / "part-00000.parquet")
    with pytest.raises(FileExistsError, match="float16=False"):
        embed_mod._claim_output(out, ckpt, True, False)


def test_cpu_inference_model_is_channels_last_and_the_same_function(archive) -> None:
    state = load_checkpoint(archive / "ckpt")
    cpu = torch.device("cpu")
    fast = model_from_state(state, cpu)
    convs = [m.weight for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    plain = build_model(state["config"])
    plain.load_state_dict(state["model"])
    batch = table_to_model_batch(pq.read_table(archive / "data" / "part-00000.parquet"), 24, 32)
    got, ref = embed_arrays(fast, batch, cpu), embed_arrays(plain.eval(), batch, cpu)
    for m in ("image", "profile"):
        np.testing.assert_allclose(got[m], ref[m], rtol=0, atol=1e-5)


def test_outputs_from_before_source_stamps_are_kept_when_their_rows_match(tmp_path) -> None:
    """Embeddings written before outputs recorded their source's rows and bytes: a rerun after the
    upgrade skips them when the row count matches (a full re-embed of an archive otherwise)."""
    data, out = tmp_path / "data", tmp_path / "emb"
    data.mkdir()
    out.mkdir()
    for name, rows in (("a.parquet", 3), ("b.parquet", 2)):
        pq.write_table(pa.table({"x": list(range(rows))}), data / name)
        meta = embed_mod.output_schema(False, "ckpt", str((data / name).resolve())).metadata
        meta = {k: v for k, v in meta.items() if k != embed_mod.SOURCE_STAMP_KEY}
        pq.write_table(pa.table({"particle_id": ["0", "1", "2"]}).replace_schema_metadata(meta), out / name)
    targets, skipped, changed = embed_mod._plan(sorted(data.glob("*.parquet")), data, out)
    assert skipped == 1 and changed == ["b.parquet"]  # b has 2 input rows but 3 embedded
    assert [t.dest.name for t in targets.values()] == ["b.parquet"]


def test_output_from_before_the_manifest_rename_resumes_and_becomes_a_dataset(
    archive, tmp_path, capsys
) -> None:
    """Outputs written when the manifest was ``embed.json`` (which pyarrow reads as a broken Parquet
    file): a rerun honours that manifest, skips the finished shards (no Ray work) and renames it."""
    data, out = tmp_path / "data", tmp_path / "emb"
    (data / "sub").mkdir(parents=True)
    names = ["part-00000.parquet", "sub/part-00002.parquet"]
    for name in names:
        shutil.copy(archive / "data" / name, data / name)
    ckpt = archive / "ckpt" / "checkpoint.pt"
    embed_mod._claim_output(out, ckpt, False, False)
    (out / embed_mod.MANIFEST).rename(out / "embed.json")  # the old layout
    targets, _, _ = embed_mod._plan(sorted(data.rglob("*.parquet")), data, out)
    shards = embed_mod._ShardOutputs(targets, False, str(ckpt.resolve()))
    for source, shard in targets.items():  # finished outputs (any vectors will do: none is re-embedded)
        ids = pq.read_table(source).column("particle_id").cast(pa.string())
        vec = pa.array([[0.5] * 16] * shard.rows, pa.list_(pa.float32()))
        shards.write(
            source,
            pa.table({"particle_id": ids, "label": ids, "domain": ids, "image_emb": vec, "profile_emb": vec}),
        )
    assert not shards.unfinished()
    with pytest.raises(pa.ArrowInvalid, match="embed.json"):  # what the reviewer hit
        ds.dataset(out, format="parquet").count_rows()
    before = _mtimes(out)
    with pytest.raises(FileExistsError, match="--overwrite"):  # the old manifest still guards --out
        embed(archive / "other", data, out)
    capsys.readouterr()
    embed(archive / "ckpt", data, out)
    assert "2 of 2 shards already embedded" in capsys.readouterr().out
    assert _mtimes(out) == before  # nothing embedded again
    assert not (out / "embed.json").exists() and (out / embed_mod.MANIFEST).exists()
    assert _read_as_dataset(out) == 2 * ROWS
    with pytest.raises(FileExistsError, match="--overwrite"):  # ... and so does the renamed one
        embed(archive / "other", data, out)


def test_a_shard_in_flight_is_hidden_from_dataset_readers(tmp_path) -> None:
    out = tmp_path / "emb"
    out.mkdir()
    schema = embed_mod.output_schema(False, "ckpt.pt", "in/part-00000.parquet")
    done = pa.table(
        {
            "particle_id": ["a"],
            "label": ["x"],
            "domain": ["LAB"],
            "image_emb": [[1.0]],
            "profile_emb": [[1.0]],
        }
    )
    pq.write_table(done.cast(schema), out / "part-00000.parquet")
    shards = {
        "in/part-00001.parquet": embed_mod._Shard(out / "part-00001.parquet", 2, ""),
    }
    outputs = embed_mod._ShardOutputs(shards, False, "ckpt.pt")
    outputs.write("in/part-00001.parquet", done.cast(schema))  # 1 of its 2 rows: still in flight
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == [".part-00001.parquet.tmp"]
    assert ds.dataset(out, format="parquet").count_rows() == 1  # only the finished shard
    assert pd.read_parquet(out)["particle_id"].tolist() == ["a"]
