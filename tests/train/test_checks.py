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
        # each of these failed only inside the Ray workers, retried train.max_failures times
        (["model.image_encoder=nosuch"], ["model.image_encoder", "'nosuch'", "timm"]),
        (["model.profile_encoder=gru"], ["model.profile_encoder", "'gru'", "cnn, lstm, transformer"]),
        (["loss.name=foo"], ["loss.name", "'foo'", "clip, dino, siglip"]),
        (["loss.kwargs.foo=1"], ["loss.name='clip'", "foo"]),
        (["loss.name=dino", "loss.kwargs.n_locals=2"], ["loss.kwargs", "n_locals", "n_local"]),
        (["model.profile_kwargs.hidden=8"], ["model.profile_kwargs.hidden", "'cnn'", "base_channels"]),
        (["data.image_size=-5"], ["data.image_size", ">= 1", "got -5"]),
        (["data.profile_length=0"], ["data.profile_length", ">= 1", "got 0"]),
        (["model.embed_dim=0"], ["model.embed_dim", ">= 1"]),
        (["loss.buckets=0"], ["loss.buckets", ">= 1"]),
        (["eval.k=0"], ["eval.k", ">= 1"]),
        (["eval.gallery_sizes=[1, 0]"], ["eval.gallery_sizes[1]", ">= 1"]),
        (["data.val_max_particles=-1"], ["data.val_max_particles", ">= 0"]),
        (["data.seed=-1"], ["data.seed", ">= 0"]),
        (["optim.momentum=-0.5"], ["optim.momentum", ">= 0"]),
        (["train.cpus_per_worker=0"], ["train.cpus_per_worker", "> 0"]),
        (["train.max_failures=-2"], ["train.max_failures", ">= -1"]),
        (["data.augment.flip=1.5"], ["data.augment.flip", "[0, 1]", "1.5"]),
        (["data.augment.crop_scale_min=0"], ["data.augment.crop_scale_min", "(0, 1]"]),
        (["data.augment.noise=-0.1"], ["data.augment.noise", ">= 0"]),
        (["eval.val_combo=X-Y"], ["eval.val_combo", "'X-Y'", "I+P-I+P"]),
        (["eval.combos=[I-I, I-Q]"], ["eval.combos[1]", "'I-Q'", "P-P"]),
        (["optim.name=adam"], ["optim.name", "sgd, adamw", "'adam'"]),
        (["data.image_norm=local"], ["data.image_norm", "fixed, background", "'local'"]),
        (["data.shuffle=random"], ["data.shuffle", "global, local, none", "'random'"]),
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


@pytest.mark.parametrize(
    "sets",
    [
        ["model.profile_encoder=lstm", "model.profile_kwargs={hidden: 16}"],
        ["loss.name=dino", "loss.kwargs.n_local=2", "model.profile_kwargs.unused_by_dino=1"],
        ["eval.val_combo=I+P - P", "optim.name=sgd", "data.image_norm=background"],
    ],
)
def test_valid_settings_pass(sets):
    check_train_config(load_config(None, sets))


def test_a_bad_set_value_is_one_line_before_ray_starts(monkeypatch, capsys):
    import xmodal.runtime
    from xmodal.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a config that cannot train")

    monkeypatch.setattr(xmodal.runtime, "init_ray", no_ray)
    monkeypatch.delenv("XMODAL_DEBUG", raising=False)
    config = str(REPO / "configs" / "laptop.yaml")
    assert main(["pretrain", "--config", config, "--set", "model.image_encoder=nosuch"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("xmodal pretrain: error: model.image_encoder: unknown image encoder 'nosuch'")
