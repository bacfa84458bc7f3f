import math

import pytest
import torch

from xmodal.config import Config, OptimConfig
from xmodal.train.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from xmodal.train.optim import build_optimizer, build_scheduler, warmup_cosine


def test_warmup_cosine_shape():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.0, abs=1e-12)


def test_scheduler_follows_formula_for_sgd_nesterov():
    p = torch.nn.Parameter(torch.zeros(3))
    cfg = OptimConfig(name="sgd", lr=0.5, epochs=2, warmup_epochs=1)
    opt = build_optimizer([{"params": [p], "weight_decay": 0.0}], cfg)
    assert opt.defaults["nesterov"] is True
    sched = build_scheduler(opt, cfg, steps_per_epoch=5)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5 * warmup_cosine(s, 5, 10) for s in range(10)])


def test_unknown_optimizer_is_a_clear_error():
    with pytest.raises(ValueError, match="optim.name 'lamb'"):
        build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))]}], OptimConfig(name="lamb"))


def test_checkpoint_round_trip_is_weights_only(tmp_path):
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    cfg = Config()
    d = save_checkpoint(
        tmp_path / "checkpoint_000001",
        cfg,
        model,
        epoch=1,
        global_step=7,
        optimizer=opt,
        metrics={"val_score": 0.5},
    )
    state = load_checkpoint(d)
    assert state["epoch"] == 1 and state["global_step"] == 7 and state["config"] == cfg
    assert torch.equal(state["model"]["weight"], model.weight)
    assert "optimizer" in state and state["metrics"]["val_score"] == 0.5
    assert resolve_checkpoint(tmp_path) == d


def test_load_refuses_foreign_files(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="not an xmodal checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="xmodal pretrain"):
        resolve_checkpoint(tmp_path / "nothing")
