"""The per-worker training loop (xmodal/train/loop.py) run in this process, with Ray Train's worker
API replaced by fakes: the optimizer steps it takes, the learning rate of each, gradient
accumulation with and without DDP, and the step numbers it logs. Real Ray Train runs the same loop
in tests/train/test_pretrain_ray.py (2 workers, optim.grad_accum=2)."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
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


class Checkpoint:
    """What ray.train.get_checkpoint gives a resumed worker: a folder."""

    def __init__(self, path: Path):
        self.path = str(path)

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


class Stop(Exception):
    """Ends a run after an epoch's report, as a killed worker group would."""


def run_loop(
    mp: pytest.MonkeyPatch,
    cfg: Config,
    shard: dict,
    run_dir: Path,
    world: int = 1,
    prepare=None,
    resume: Path | None = None,
    stop_after: int | None = None,
):
    """Rank 0 of ``world`` workers trains on ``shard`` (the global pool: ``world`` such shards),
    from the checkpoint folder ``resume`` if given, until epoch ``stop_after`` if given.
    Returns what it recorded: every optimizer step's lr and micro-batch count, the epoch reports,
    the last checkpoint's weights and the metrics.jsonl records. The last checkpoint is kept in
    ``run_dir/ckpt``."""
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
            shutil.copytree(checkpoint.path, run_dir / "ckpt", dirs_exist_ok=True)
        if metrics["epoch"] == stop_after:
            raise Stop

    mp.setattr(loop, "build_optimizer", recording_optimizer)
    mp.setattr(ray.train, "get_context", lambda: Context(world))
    mp.setattr(ray.train, "get_checkpoint", lambda: Checkpoint(resume) if resume else None)
    mp.setattr(ray.train, "get_dataset_shard", lambda name: Shard(shard))
    mp.setattr(ray.train, "report", report)
    mp.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    mp.setattr(ray.train.torch, "prepare_model", prepare or (lambda m, **kw: m))
    n_train = world * len(shard["image"])
    with contextlib.suppress(Stop):
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
    # in the loop's memory layout (train.channels_last), so that only the arithmetic is compared
    cl = torch.channels_last
    model = build_model(cfg).train().to(memory_format=cl)
    for half in (slice(0, 4), slice(4, 8)):
        micro = {k: v[half] for k, v in data.items()}
        loss, _ = model({**micro, "image": micro["image"].contiguous(memory_format=cl)})
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


def test_without_a_validation_set_no_score_ranks_the_checkpoints(accumulated):
    # Ray Train keeps the latest checkpoint when no val_score is reported (trainer.build_trainer):
    # a score of -train_loss named DINO's first epoch best, its loss rising while it learns
    assert accumulated["reports"] and all("val_score" not in r for r in accumulated["reports"])


def stopped_and_resumed(tmp_path: Path, first: Config, second: Config, data: dict) -> dict[str, Any]:
    """Epoch 1 under ``first``, stopped; then the rest resumed from its checkpoint under ``second``."""
    with pytest.MonkeyPatch.context() as mp:
        run_loop(mp, first, data, tmp_path / "run", stop_after=1)
    with pytest.MonkeyPatch.context() as mp:
        return run_loop(mp, second, data, tmp_path / "run", resume=tmp_path / "run" / "ckpt")


DINO = {
    "loss.name": "dino",
    "loss.kwargs": "{out_dim: 16, hidden_dim: 16, bottleneck_dim: 8, n_local: 1, local_size: 8}",
    "optim.batch_size": 8,
    "optim.epochs": 2,
}


def test_a_resumed_dino_run_draws_the_crops_of_the_uninterrupted_run(tmp_path):
    """DINO's views are drawn from torch's RNG in the worker: a resumed run re-seeded as at the start
    replayed epoch 1's crops in epoch 2 and ended with other weights."""
    cfg = tiny_config(**DINO)
    data = particles(16)
    with pytest.MonkeyPatch.context() as mp:
        whole = run_loop(mp, cfg, data, tmp_path / "whole")
    resumed = stopped_and_resumed(tmp_path / "parts", cfg, cfg, data)
    assert [r["epoch"] for r in resumed["reports"]] == [2]
    assert resumed["weights"].keys() == whole["weights"].keys()
    for name, w in whole["weights"].items():
        assert torch.equal(resumed["weights"][name], w), name


def test_a_resumed_run_takes_the_configs_lr_and_weight_decay(tmp_path, capfd):
    base = {"optim.batch_size": 8, "optim.epochs": 2, "optim.warmup_epochs": 1, "optim.lr": LR}
    first = tiny_config(**base, **{"optim.weight_decay": 0.001})
    second = tiny_config(**(base | {"optim.lr": LR / 10, "optim.weight_decay": 0.05}))
    rec = stopped_and_resumed(tmp_path, first, second, particles(32))  # 4 steps an epoch
    assert rec["lrs"] == pytest.approx([LR / 10 * warmup_cosine_reference(s, 4, 8) for s in range(4, 8)])
    state = torch.load(tmp_path / "run" / "ckpt" / "checkpoint.pt", weights_only=True)
    assert sorted(g["weight_decay"] for g in state["optimizer"]["param_groups"]) == [0.0, 0.05]
    assert state["scheduler"]["base_lrs"] == pytest.approx([LR / 10] * 2)
    out = capfd.readouterr().out
    assert "optim.lr 0.01 -> 0.001, optim.weight_decay 0.001 -> 0.05 " in out


def test_an_unchanged_resume_says_nothing_of_the_optimizer(tmp_path, capfd):
    cfg = tiny_config(**{"optim.batch_size": 8, "optim.epochs": 2})
    stopped_and_resumed(tmp_path, cfg, cfg, particles(16))
    out = capfd.readouterr().out
    assert "resuming from epoch 1" in out and "checkpoint's values are replaced" not in out


def test_a_run_from_pretrained_weights_resumes_after_the_weights_file_is_gone(tmp_path):
    import timm

    weights = tmp_path / "init.pth"
    torch.save(timm.create_model("resnet10t", in_chans=1, num_classes=0).state_dict(), weights)
    cfg = tiny_config(**{"optim.batch_size": 8, "optim.epochs": 2, "model.pretrained_path": weights})
    with pytest.MonkeyPatch.context() as mp:
        run_loop(mp, cfg, particles(16), tmp_path / "run", stop_after=1)
    weights.unlink()  # cleaned up, or the run resumes on another node
    with pytest.MonkeyPatch.context() as mp:
        rec = run_loop(mp, cfg, particles(16), tmp_path / "run", resume=tmp_path / "run" / "ckpt")
    assert [r["epoch"] for r in rec["reports"]] == [2]
