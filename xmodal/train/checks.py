"""The training settings checked before anything starts (``xmodal pretrain`` before Ray starts,
``build_trainer`` where each Tune trial starts, and a sweep's validation): a bad value fails at once
with its key named, not after Ray starts or an epoch ends."""

from __future__ import annotations

from xmodal.config import Config, ConfigError

PRECISIONS = ("auto", "bf16", "fp32")  # auto: bf16 autocast on CUDA, fp32 on CPU


def check_train_config(cfg: Config) -> None:
    from xmodal.data.transforms import check_image_norm

    o, t, loss = cfg.optim, cfg.train, cfg.loss
    at_least_one = {
        "optim.epochs": o.epochs,
        "optim.batch_size": o.batch_size,
        "optim.grad_accum": o.grad_accum,
        "train.num_workers": t.num_workers,
        "train.checkpoint_every": t.checkpoint_every,
        "train.log_every": t.log_every,
        "eval.val_n": cfg.eval.val_n,
        "eval.val_repeats": cfg.eval.val_repeats,
    }
    for key, value in at_least_one.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    at_least_zero = {
        "optim.warmup_epochs": o.warmup_epochs,
        "optim.weight_decay": o.weight_decay,
        "model.center_particles": cfg.model.center_particles,  # 0 = no centring
    }
    for key, value in at_least_zero.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
    if t.precision not in PRECISIONS:
        raise ConfigError(
            f"train.precision must be one of {', '.join(PRECISIONS)} (auto: bf16 on CUDA, fp32 on CPU), "
            f"got {t.precision!r}"
        )
    split = t.num_workers * o.grad_accum
    if o.batch_size % split:
        below = max(split, o.batch_size // split * split)
        raise ConfigError(
            f"optim.batch_size={o.batch_size} must be divisible by train.num_workers x optim.grad_accum "
            f"= {t.num_workers} x {o.grad_accum} = {split}: it is the batch of every optimizer step, each "
            f"worker's share taken in optim.grad_accum equal micro-batches; set optim.batch_size to "
            f"{below} or {below + split}"
        )
    if not 0 < loss.logit_scale <= loss.max_logit_scale:
        raise ConfigError(
            f"loss.logit_scale={loss.logit_scale:g} must be > 0 and at most loss.max_logit_scale="
            f"{loss.max_logit_scale:g} (its clamp after every step); lower loss.logit_scale or raise "
            "loss.max_logit_scale"
        )
    check_image_norm(cfg.data.image_norm)
