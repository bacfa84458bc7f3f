import copy
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from xmodal.config import Config, OptimConfig, config_from_dict
from xmodal.data.quarantine import DataError
from xmodal.train.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from xmodal.train.optim import build_optimizer, build_scheduler, resume_optimizer, warmup_cosine


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


def _toy_groups(seed: int) -> list[dict]:
    torch.manual_seed(seed)
    w, b, scale = (
        torch.nn.Parameter(torch.randn(6, 5)),
        torch.nn.Parameter(torch.randn(6)),
        torch.nn.Parameter(torch.tensor(2.6)),
    )
    return [{"params": [w], "weight_decay": 0.01}, {"params": [b, scale], "weight_decay": 0.0}]


def _train(opt: torch.optim.Optimizer, groups: list[dict], steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        for group in groups:
            for p in group["params"]:
                p.grad = torch.randn(p.shape, generator=g)
        opt.step()


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_optimizer_follows_the_reference_update_and_resumes_from_unfused_state(name):
    cfg = OptimConfig(name=name, lr=0.05)
    ours_groups, ref_groups = _toy_groups(0), _toy_groups(0)
    ours = build_optimizer(ours_groups, cfg)
    assert ours.defaults["fused"] is True  # CPU parameters: torch's fused kernels
    kind = torch.optim.SGD if name == "sgd" else torch.optim.AdamW
    extra = {"momentum": 0.9, "nesterov": True} if name == "sgd" else {}
    ref = kind(ref_groups, lr=0.05, foreach=False, **extra)  # torch's per-tensor reference loop
    _train(ours, ours_groups, range(5))
    _train(ref, ref_groups, range(5))
    for a, b in zip(*[[p for g in gs for p in g["params"]] for gs in (ours_groups, ref_groups)]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # a checkpoint written by the unfused optimizer (runs from before) continues identically
    resumed_groups = [
        {**g, "params": [p.detach().clone().requires_grad_() for p in g["params"]]} for g in ref_groups
    ]
    resumed = build_optimizer(resumed_groups, cfg)
    resumed.load_state_dict(copy.deepcopy(ref.state_dict()))  # as read back from a checkpoint file
    _train(resumed, resumed_groups, range(5, 8))
    _train(ref, ref_groups, range(5, 8))
    for a, b in zip(*[[p for g in gs for p in g["params"]] for gs in (resumed_groups, ref_groups)]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
@pytest.mark.parametrize("saved_nhwc", [False, True], ids=["nchw-to-nhwc", "nhwc-to-nchw"])
def test_a_resume_in_the_other_memory_layout_continues_the_run_exactly(name, saved_nhwc):
    """``train.channels_last`` changed between a checkpoint and its resume (CPU runs trained NCHW
    before 2026-11-28): torch's fused kernels update wrongly when moments and parameters differ in
    layout, so ``resume_optimizer`` lays the moments out like their parameters."""
    cfg = OptimConfig(name=name, lr=0.05, epochs=2, warmup_epochs=0)
    state_cfg = config_from_dict({"optim": {"name": name, "lr": 0.05, "epochs": 2, "warmup_epochs": 0}})
    layouts = {False: torch.contiguous_format, True: torch.channels_last}

    def model(nhwc: bool) -> list[dict]:
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=layouts[nhwc])
        return [{"params": [conv.weight], "weight_decay": 0.01}, {"params": [conv.bias], "weight_decay": 0.0}]

    def run(groups: list[dict], steps: range, opt=None, sched=None):
        opt = opt or build_optimizer(groups, cfg)
        sched = sched or build_scheduler(opt, cfg, 4)
        for step in steps:
            g = torch.Generator().manual_seed(step)
            for group in groups:
                for p in group["params"]:
                    p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g))  # in p's layout
            opt.step()
            sched.step()
        return opt, sched

    ref_groups = model(saved_nhwc)
    opt, sched = run(ref_groups, range(3))
    state = copy.deepcopy({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "config": state_cfg})
    resumed_groups = model(not saved_nhwc)
    with torch.no_grad():
        for a, b in zip(resumed_groups, ref_groups):
            a["params"][0].copy_(b["params"][0])
    resumed = build_optimizer(resumed_groups, cfg)
    resumed_sched = build_scheduler(resumed, cfg, 4)
    resume_optimizer(resumed, resumed_sched, state, cfg)
    run(resumed_groups, range(3, 6), resumed, resumed_sched)
    run(ref_groups, range(3, 6), opt, sched)
    for a, b in zip(resumed_groups, ref_groups):
        torch.testing.assert_close(a["params"][0], b["params"][0], rtol=1e-6, atol=1e-7)


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


def test_checkpoints_from_before_image_norm_load_with_the_fixed_mapping_they_were_trained_on(tmp_path):
    cfg = config_from_dict({"data": {"image_norm": "background"}})
    assert Config().data.image_norm == "fixed"
    d = save_checkpoint(tmp_path / "checkpoint_000001", cfg, torch.nn.Linear(2, 2), epoch=1, global_step=1)
    assert load_checkpoint(d)["config"].data.image_norm == "background"
    state = torch.load(d / "checkpoint.pt", weights_only=True)
    del state["config"]["data"]["image_norm"]  # as written before the setting existed
    torch.save(state, d / "checkpoint.pt")
    assert load_checkpoint(d)["config"].data.image_norm == "fixed"


def test_load_refuses_foreign_files(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "checkpoint.pt")
    with pytest.raises(DataError, match="not an xmodal checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="xmodal pretrain"):
        resolve_checkpoint(tmp_path / "nothing")


class Payload:
    """Unpickling this would call ``print``: code the weights-only loader must refuse."""

    def __reduce__(self):
        return (print, ("payload ran",))


def broken_files(tmp_path) -> dict:
    good = save_checkpoint(tmp_path / "good", Config(), torch.nn.Linear(64, 64), epoch=1, global_step=1)
    data = (good / "checkpoint.pt").read_bytes()
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "part-00000.parquet")
    torch.save({"format": "xmodal-checkpoint-1", "code": Payload()}, tmp_path / "payload.pt")
    files = {"parquet": tmp_path / "part-00000.parquet", "payload": tmp_path / "payload.pt"}
    for name, content in {
        "truncated": data[:10000],  # torch: a bare "OSError: [Errno 22] Invalid argument"
        "half": data[: len(data) // 2],
        "empty": b"",
        "text": b"hello\n",
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "checkpoint.pt").write_bytes(content)
        files[name] = tmp_path / name
    return files


@pytest.mark.parametrize("kind", ["truncated", "half", "empty", "text", "parquet", "payload"])
def test_an_unreadable_checkpoint_is_one_line_naming_the_file(tmp_path, kind):
    path = broken_files(tmp_path)[kind]
    with pytest.raises(DataError) as e:
        load_checkpoint(path)
    message = str(e.value)
    shown = path / "checkpoint.pt" if path.is_dir() else path
    assert message.startswith(f"{shown} is not a readable xmodal checkpoint: ")
    assert "\n" not in message and "weights_only" not in message  # torch advises weights_only=False
    if kind == "payload":
        assert "could run code" in message
