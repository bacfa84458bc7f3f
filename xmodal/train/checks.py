"""The training settings checked before anything starts (``xmodal pretrain`` before Ray starts,
``build_trainer`` where each Tune trial starts, and a sweep's validation): a bad value fails at once
with its key, the value and what is allowed named, not in every Ray worker, retried
``train.max_failures`` times, after Ray starts or an epoch ends."""

from __future__ import annotations

from typing import Any

from xmodal.config import Config, ConfigError

PRECISIONS = ("auto", "bf16", "fp32")  # auto: bf16 autocast on CUDA, fp32 on CPU
OPTIMIZERS = ("sgd", "adamw")  # xmodal/train/optim.py builds these


def check_train_config(cfg: Config) -> None:
    _check_ranges(cfg)
    _check_choices(cfg)
    _check_names(cfg)
    o, t, loss = cfg.optim, cfg.train, cfg.loss
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


def _check_ranges(cfg: Config) -> None:
    d, m, o, t, e, aug = cfg.data, cfg.model, cfg.optim, cfg.train, cfg.eval, cfg.data.augment
    at_least_one = {
        "data.image_size": d.image_size,
        "data.profile_length": d.profile_length,
        "model.embed_dim": m.embed_dim,
        "loss.buckets": cfg.loss.buckets,
        "optim.epochs": o.epochs,
        "optim.batch_size": o.batch_size,
        "optim.grad_accum": o.grad_accum,
        "train.num_workers": t.num_workers,
        "train.checkpoint_every": t.checkpoint_every,
        "train.log_every": t.log_every,
        "eval.val_n": e.val_n,
        "eval.val_repeats": e.val_repeats,
        "eval.k": e.k,
        "eval.repeats": e.repeats,
        **{f"eval.gallery_sizes[{i}]": n for i, n in enumerate(e.gallery_sizes)},
    }
    _at_least(at_least_one, 1)
    _at_least(
        {
            "data.val_max_particles": d.val_max_particles,  # 0 = no cap
            "model.center_particles": m.center_particles,  # 0 = no centring
            "optim.warmup_epochs": o.warmup_epochs,
            "optim.weight_decay": o.weight_decay,
            "optim.momentum": o.momentum,
            # numpy's generators refuse negative seeds
            "data.seed": d.seed,
            "train.seed": t.seed,
            "eval.seed": e.seed,
            # strengths: a negative std or jitter range is meaningless
            "data.augment.brightness": aug.brightness,
            "data.augment.noise": aug.noise,
            "data.augment.amplitude": aug.amplitude,
            "data.augment.blur_sigma_max": aug.blur_sigma_max,
        },
        0,
    )
    _at_least({"train.max_failures": t.max_failures}, -1, " (-1 = retry without limit)")
    for key, value in {"optim.lr": o.lr, "train.cpus_per_worker": t.cpus_per_worker}.items():
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value:g}")
    # probabilities, and contrast: its factor is drawn from [1 - contrast, 1 + contrast]
    for name in ("flip", "resized_crop", "blur", "band_drop", "temporal_crop", "contrast"):
        value = getattr(aug, name)
        if not 0 <= value <= 1:
            raise ConfigError(f"data.augment.{name} must be in [0, 1], got {value:g}")
    # the smallest fraction of the image area / profile length a crop keeps
    for name in ("crop_scale_min", "temporal_crop_min"):
        value = getattr(aug, name)
        if not 0 < value <= 1:
            raise ConfigError(f"data.augment.{name} must be in (0, 1], got {value:g}")


def _at_least(values: dict[str, Any], low: int, note: str = "") -> None:
    for key, value in values.items():
        if value < low:
            raise ConfigError(f"{key} must be >= {low}{note}, got {value:g}")


def _check_choices(cfg: Config) -> None:
    from xmodal.data.pipeline import SHUFFLES
    from xmodal.data.transforms import IMAGE_NORMS
    from xmodal.eval.protocol import COMBOS, parse_combo

    choices = {
        "train.precision": (cfg.train.precision, PRECISIONS, " (auto: bf16 on CUDA, fp32 on CPU)"),
        "optim.name": (cfg.optim.name, OPTIMIZERS, ""),
        "data.image_norm": (cfg.data.image_norm, IMAGE_NORMS, ""),
        "data.shuffle": (cfg.data.shuffle, SHUFFLES, ""),
    }
    for key, (value, allowed, note) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}{note}, got {value!r}")
    if not cfg.eval.combos or not cfg.eval.gallery_sizes:
        raise ConfigError(
            f"eval.combos and eval.gallery_sizes must not be empty, got {cfg.eval.combos} and "
            f"{cfg.eval.gallery_sizes}"
        )
    combos = {"eval.val_combo": cfg.eval.val_combo}
    combos |= {f"eval.combos[{i}]": c for i, c in enumerate(cfg.eval.combos)}
    for key, combo in combos.items():
        try:
            parse_combo(combo)
        except ConfigError:
            raise ConfigError(
                f"{key} must be a GALLERY-QUERY combination, one of {', '.join(COMBOS)}; got {combo!r}"
            ) from None


def _check_names(cfg: Config) -> None:
    """Every registry name; the loss built as each worker builds it (cheap, unlike the image
    encoder), so its settings (``loss.kwargs``) are checked too; the profile encoder's arguments."""
    from xmodal.models.losses import ContrastiveLoss
    from xmodal.models.registries import LOSSES, check_name, check_profile_kwarg

    m = cfg.model
    for key, name in {
        "model.image_encoder": m.image_encoder,
        "model.profile_encoder": m.profile_encoder,
        "loss.name": cfg.loss.name,
    }.items():
        check_name(key, name)
    try:
        loss = LOSSES.build(cfg.loss.name, cfg=cfg.loss)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"loss.name={cfg.loss.name!r} cannot be built from these loss settings: {e}"
        ) from None
    if not isinstance(loss, ContrastiveLoss):
        return  # the image-only DINO baseline builds no profile encoder
    # argument names only: values interact (a transformer's width and heads), and a sweep probes
    # each searched value on its own
    for arg in m.profile_kwargs:
        check_profile_kwarg(m.profile_encoder, arg, f"model.profile_kwargs.{arg}")
