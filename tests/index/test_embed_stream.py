"""Streaming ``embed``: one output shard per input shard, equal to in-process embedding; an
interrupted run keeps its finished shards and a rerun only embeds what is missing (also new shards
of a growing archive); another model's output folder is refused."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from xmodal.config import load_config
from xmodal.data.pipeline import table_to_model_batch
from xmodal.data.synth import synthesize
from xmodal.eval import embed as embed_mod
from xmodal.eval.embed import embed, embed_arrays, model_from_state
from xmodal.eval.embeddings import load_embeddings
from xmodal.index.build import CHECKPOINT_KEY
from xmodal.models.build import build_model
from xmodal.train.checkpoint import load_checkpoint, save_checkpoint

ROWS = 60


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Five input shards (one in a sub-folder, one empty) and a random-weights tiny model."""
    root = tmp_path_factory.mktemp("archive")
    synthesize(root / "syn", n_lab=0, n_sea=0, n_uto=4 * ROWS, seed=0, fmt="parquet", image_size=24)
    table = pq.read_table(root / "syn" / "UTO")
    (root / "data" / "sub").mkdir(parents=True)
    names = ["part-00000.parquet", "part-00001.parquet", "sub/part-00002.parquet", "part-00003.parquet"]
    for i, name in enumerate(names):
        pq.write_table(table.slice(i * ROWS, ROWS), root / "data" / name)
    pq.write_table(table.slice(0, 0), root / "data" / "part-00004.parquet")
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


@pytest.mark.slow
def test_embed_streams_resumes_and_grows(ray_session, archive, tmp_path, monkeypatch, capsys) -> None:
    torch.set_num_threads(1)
    data, out = archive / "data", tmp_path / "emb"
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
    assert embed_mod.CHECKPOINT_KEY == CHECKPOINT_KEY  # the key `xmodal index build` reads

    # run 3: nothing left to do (no Ray work); another model may not write into this folder
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    embed(archive / "ckpt", data, out)
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    with pytest.raises(FileExistsError, match="--overwrite"):
        embed(archive / "other", data, out)


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
