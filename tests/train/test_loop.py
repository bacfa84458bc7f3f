"""The per-worker training loop (xmodal/train/loop.py) run in this process, with Ray Train's worker
API replaced by fakes: the optimizer steps it takes, the learning rate of each, gradient
accumulation with and without DDP, and the step numbers it logs. Real Ray Train runs the same loop
in tests/train/test_pretrain_ray.py (2 workers, optim.grad_accum=2)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from xmodal.config import Config, load_config
from xmodal.models.build import build_model

SIZE = 16  # image side and profile length


def particles(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(n, 1, SIZE, SIZE, generator=g) * 2 - 1,
        "image_meta": torch.rand(n, 2, generator=g),
        "profile": torch.rand(n, 6, SIZE, generator=g) * 2 - 1,
        "profile_mask": torch.ones(n, SIZE, dtype=torch.bool),
        "profile_meta": torch.rand(n, 1, generator=g),
        "has_image": torch.ones(n, dtype=torch.bool),
        "has_profile": torch.ones(n, dtype=torch.bool),
    }


def tiny_config(**sets: Any) -> Config:
    base = {
        "data.image_size": SIZE,
        "data.profile_length": SIZE,
        "model.embed_dim": 8,
        "model.profile_kwargs": "{base_channels: 8, blocks: [1, 1]}",
        "model.center_particles": 0,
        "train.num_workers": 1,
        "train.log_every": 1,
    }
    return load_config(None, [f"{k}={v}" for k, v in (base | sets).items()])


class Shard:
    """A worker's dataset shard: consecutive rows in micro-batches, the last partial one dropped."""

    def __init__(self, data: dict[str, torch.Tensor]):
        self.data = data

    def iter_torch_batches(self, batch_size, drop_last, prefetch_batches, device):
        n = len(self.data["image"])
        for start in range(0, n - batch_size + 1 if drop_last else n, batch_size):
            yield {k: v[start : start + batch_size].clone() for k, v in self.data.items()}


class Context:
    def __init__(self, world: int):
        self.world = world

    def get_world_rank(self) -> int:
        return 0

    def get_world_size(self) -> int:
        return self.world


def run_loop(mp: pytest.MonkeyPatch, cfg: Config, shard: dict, run_dir: Path, world: int = 1, prepare=None):
    """Rank 0 of ``world`` workers trains on ``shard`` (the global pool: ``world`` such shards).
    Returns what it recorded: every optimizer step's lr and micro-batch count, the epoch reports,
    the last checkpoint's weights and the metrics.jsonl records."""
    import ray.train
    import ray.train.torch

    import xmodal.train.loop as loop
    from xmodal.train.optim import build_optimizer

    rec: dict[str, Any] = {"lrs": [], "micro": [], "reports": [], "weights": None}
    pending = [0]

    def recording_optimizer(groups, optim_cfg):
        opt = build_optimizer(groups, optim_cfg)
        first = groups[0]["params"][0]  # receives a gradient from every micro-batch's backward
        first.register_post_accumulate_grad_hook(lambda p: pending.__setitem__(0, pending[0] + 1))

        def before_step(o, args, kwargs):
            rec["lrs"].append(o.param_groups[0]["lr"])
            rec["micro"].append(pending[0])
            pending[0] = 0

        opt.register_step_pre_hook(before_step)
        return opt

    def report(metrics, checkpoint=None):
        rec["reports"].append(metrics)
        if checkpoint is not None:
            rec["weights"] = torch.load(Path(checkpoint.path) / "checkpoint.pt", weights_only=True)["model"]

    mp.setattr(loop, "build_optimizer", recording_optimizer)
    mp.setattr(ray.train, "get_context", lambda: Context(world))
    mp.setattr(ray.train, "get_checkpoint", lambda: None)
    mp.setattr(ray.train, "get_dataset_shard", lambda name: Shard(shard))
    mp.setattr(ray.train, "report", report)
    mp.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    mp.setattr(ray.train.torch, "prepare_model", prepare or (lambda m, **kw: m))
    n_train = world * len(shard["image"])
    loop.train_loop_per_worker(
        {"cfg": cfg.to_dict(), "val": None, "center": None, "n_train": n_train, "run_dir": str(run_dir)}
    )
    rec["log"] = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rec


def warmup_cosine_reference(step: int, warmup: int, total: int) -> float:
    """The schedule as documented: linear warm-up to 1 over ``warmup`` steps, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2


LR = 0.01


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory) -> dict[str, Any]:
    """grad_accum 2, batch 8 (micro-batches of 4), 36 particles: 9 micro-batches an epoch, the 9th
    one too few for a step; 2 epochs of 4 steps, warm-up 1 epoch."""
    cfg = tiny_config(
        **{
            "optim.grad_accum": 2,
            "optim.batch_size": 8,
            "optim.epochs": 2,
            "optim.warmup_epochs": 1,
            "optim.lr": LR,
        }
    )
    with pytest.MonkeyPatch.context() as mp:
        return run_loop(mp, cfg, particles(36), tmp_path_factory.mktemp("accum"))


def test_every_step_sums_grad_accum_micro_batches_of_its_own_epoch(accumulated):
    # the 9th micro-batch of an epoch is not trained on: no step of 3, none carried into the next epoch
    assert accumulated["micro"] == [2] * 8
    assert [r["global_step"] for r in accumulated["reports"]] == [4, 8]


def test_the_schedule_has_the_steps_taken_and_the_log_shows_each_steps_lr(accumulated):
    expected = [LR * warmup_cosine_reference(s, warmup=4, total=8) for s in range(8)]
    assert accumulated["lrs"] == pytest.approx(expected)
    assert accumulated["lrs"][-1] > 0  # the last step still learns: the schedule was not overrun
    steps = [r for r in accumulated["log"] if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert [r["lr"] for r in steps] == pytest.approx(accumulated["lrs"])  # the lr the step used
    epochs = [r for r in accumulated["log"] if r["kind"] == "epoch"]
    assert [r["lr"] for r in epochs] == pytest.approx([expected[3], expected[7]])  # each epoch's last step


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group: DDP runs its real code (no_sync, gradient all-reduce) in this process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2])
def test_an_accumulated_step_is_sgd_on_the_mean_micro_batch_gradient(tmp_path, process_group, world):
    """Rank 0 of ``world`` workers (2: its model wrapped in DDP, as prepare_model does): a per-worker
    batch of 8 in 2 micro-batches of 4, one plain-SGD step, against the gradients of the same
    micro-batches computed here on a fresh copy of the model."""
    from torch.nn.parallel import DistributedDataParallel

    cfg = tiny_config(
        **{
            "train.num_workers": world,
            "optim.batch_size": 8 * world,
            "optim.grad_accum": 2,
            "optim.epochs": 1,
            "optim.warmup_epochs": 0,
            "optim.name": "sgd",
            "optim.momentum": 0,
            "optim.weight_decay": 0,
            "optim.lr": LR,
        }
    )
    data = particles(8)
    prepare = (lambda m, **kw: DistributedDataParallel(m)) if world > 1 else None
    with pytest.MonkeyPatch.context() as mp:
        rec = run_loop(mp, cfg, data, tmp_path / "run", world=world, prepare=prepare)
    assert rec["micro"] == [2] and rec["lrs"] == pytest.approx([LR])

    torch.manual_seed(cfg.train.seed)  # as the loop seeds rank 0 before building its model
    model = build_model(cfg).train()
    for half in (slice(0, 4), slice(4, 8)):
        loss, _ = model({k: v[half] for k, v in data.items()})
        (loss / 2).backward()
    for name, p in model.named_parameters():
        expected = p.detach() - LR * p.grad
        torch.testing.assert_close(rec["weights"][name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_a_non_finite_loss_names_the_step_as_metrics_jsonl_numbers_it(tmp_path):
    from xmodal.train.loop import NonFiniteLossError

    cfg = tiny_config(**{"optim.batch_size": 4, "optim.epochs": 1})
    data = particles(16)
    data["image"][9, 0, 3, 3] = float("nan")  # the third batch of 4
    # metrics.jsonl numbers steps from 1 (test_the_schedule_has_the_steps_taken_...): the third is 3
    with pytest.MonkeyPatch.context() as mp, pytest.raises(NonFiniteLossError, match=r"^step 3: ") as e:
        run_loop(mp, cfg, data, tmp_path / "run")
    assert str(e.value).endswith("non-finite tensor(s): image")
    # the steps before it reach the run folder although the run ended within the 60-s sync period
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "step"] == [1, 2]
