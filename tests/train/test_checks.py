"""Training settings refused up front (xmodal/train/checks.py), the key named, before Ray starts or
any data is read; every shipped config passes."""

from __future__ import annotations

from pathlib import Path

import pytest

from xmodal.config import ConfigError, load_config
from xmodal.train.checks import check_train_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "sets, needles",
    [
        (["train.checkpoint_every=0"], ["train.checkpoint_every", ">= 1", "got 0"]),
        (["train.log_every=0"], ["train.log_every", ">= 1"]),
        (["optim.grad_accum=0"], ["optim.grad_accum", ">= 1"]),
        (["optim.epochs=0"], ["optim.epochs", ">= 1"]),
        (["optim.warmup_epochs=-1"], ["optim.warmup_epochs", ">= 0", "got -1"]),
        (["optim.lr=-0.1"], ["optim.lr", "> 0"]),
        (["model.center_particles=-1"], ["model.center_particles", ">= 0"]),
        (["train.precision=fp16"], ["train.precision", "auto, bf16, fp32", "'fp16'"]),
        (["train.precision=16-mixed"], ["train.precision", "'16-mixed'"]),
        (["train.precision=BF16"], ["train.precision", "'BF16'"]),
        (["train.precision=bfloat16"], ["train.precision", "'bfloat16'"]),
        (["loss.logit_scale=200"], ["loss.logit_scale=200", "loss.max_logit_scale=100"]),
        (
            ["optim.batch_size=8", "train.num_workers=1", "optim.grad_accum=3"],
            ["optim.batch_size=8", "train.num_workers", "optim.grad_accum", "= 3", "6 or 9"],
        ),
        (
            ["optim.batch_size=33", "train.num_workers=2", "optim.grad_accum=1"],
            ["optim.batch_size=33", "= 2", "32 or 34"],
        ),
    ],
)
def test_bad_training_values_are_refused_naming_the_key(sets, needles):
    cfg = load_config(None, sets)
    with pytest.raises(ConfigError) as e:
        check_train_config(cfg)
    for needle in needles:
        assert needle in str(e.value)


@pytest.mark.parametrize("precision", ["auto", "bf16", "fp32"])
def test_the_documented_precisions_pass(precision):
    check_train_config(load_config(None, [f"train.precision={precision}"]))


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_pass(path):
    check_train_config(load_config(path))


def test_pretrain_and_build_trainer_check_before_ray_starts_or_data_is_read(monkeypatch, tmp_path):
    import xmodal.runtime
    from xmodal.train.trainer import build_trainer, pretrain

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a config that cannot train")

    monkeypatch.setattr(xmodal.runtime, "init_ray", no_ray)
    cfg = load_config(None, [f"data.train={tmp_path / 'missing'}", "train.checkpoint_every=0"])
    with pytest.raises(ConfigError, match="train.checkpoint_every"):
        pretrain(cfg)
    with pytest.raises(ConfigError, match="train.checkpoint_every"):  # a Tune trial's way in
        build_trainer(cfg, "never")
