"""Validation shared by two gloo ranks (each embeds a share, xmodal/train/validate.py) gives what one
process gives on the whole set: the same center on every rank, the same scores and validation loss
on rank 0, even when rank 1's batch-norm statistics have drifted from rank 0's (as DDP leaves them
after each rank's last training step)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from xmodal.config import load_config
from xmodal.data.pipeline import load_labelled
from xmodal.data.synth import synthesize
from xmodal.models.build import build_model
from xmodal.train import validate as V

CPU = torch.device("cpu")
CHUNK = 16  # several validation-loss chunks, so that both ranks compute some


def _config():
    sets = {"data.image_size": 16, "data.profile_length": 16, "model.embed_dim": 8, "eval.val_n": 2}
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(_config())
    model.train()
    with torch.no_grad():  # running statistics that are not the initial ones
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _run(model: torch.nn.Module, sample: dict, val: dict) -> dict:
    embedded = []
    embed = model.embed
    model.embed = lambda batch: embedded.append(len(batch["has_image"])) or embed(batch)
    norms = V.update_center(model, sample, CPU)
    out = V.validate(model, val, _config(), CPU)
    center = {k: v.clone() for k, v in model.embed_center.state_dict().items()}
    return {"norms": norms, "val": out, "center": center, "embedded_rows": sum(embedded)}


def _worker(rank: int, world: int, work: str) -> None:
    V.VAL_CHUNK = CHUNK  # a process of its own
    sample, val = pickle.loads((Path(work) / "data.pkl").read_bytes())
    model = _model()
    if rank == 1:  # drifted statistics: the shared embedding must use rank 0's
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.running_mean.add_(0.5)
    torch.save(_run(model, sample, val), Path(work) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory, spawn_gloo) -> tuple[dict, list[dict]]:
    root = tmp_path_factory.mktemp("valdist")
    synthesize(root, n_lab=45, n_sea=0, n_uto=0, seed=3, fmt="parquet", image_size=24)
    val = load_labelled(str(root / "LAB"), 16, 16)
    n = len(val["has_image"])
    sample = {k: v[: n - 4] for k, v in val.items()}  # an uneven split between the ranks
    (root / "data.pkl").write_bytes(pickle.dumps((sample, val)))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(V, "VAL_CHUNK", CHUNK)
        one = _run(_model(), sample, val)
    spawn_gloo(_worker, 2, str(root))
    return one, [torch.load(root / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_every_rank_sets_the_single_process_center(results) -> None:
    one, ranks = results
    for r in ranks:
        for name, want in one["center"].items():
            torch.testing.assert_close(r["center"][name], want, rtol=0, atol=1e-6)
        assert r["norms"] == pytest.approx(one["norms"], abs=1e-6)


def test_rank_0_gets_the_single_process_scores_and_loss(results) -> None:
    one, (r0, r1) = results
    assert set(r0["val"]) == set(one["val"]) and {"val_score", "val_loss", "val_i2p_top1"} <= set(one["val"])
    for key, want in one["val"].items():
        if isinstance(want, float):
            assert r0["val"][key] == pytest.approx(want, abs=1e-5), key
        else:
            assert r0["val"][key] == want
    assert r1["val"] == {}


def test_each_rank_embeds_only_its_share(results) -> None:
    one, ranks = results
    rows = [r["embedded_rows"] for r in ranks]
    assert sum(rows) == one["embedded_rows"] and 0 < min(rows) < one["embedded_rows"]
