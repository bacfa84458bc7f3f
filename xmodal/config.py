"""Typed run configuration: dataclasses loaded from YAML, with ``--set key=value`` overrides.

Defaults run on a laptop (2 CPU cores, small encoders, 32 px). The paper's GPU setups live in
``configs/paper_*.yaml``. Unknown keys are errors that name the key and the file, never ignored.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class AugmentConfig:
    """Paired augmentations (applied per batch, seeded). Probabilities/strengths; 0 disables."""

    flip: float = 0.5  # flip image horizontally AND reverse the profile (the paper's paired aug)
    resized_crop: float = 0.5  # probability of a random resized crop of the image
    crop_scale_min: float = 0.6
    brightness: float = 0.2
    contrast: float = 0.2
    blur: float = 0.0  # probability of a Gaussian defocus blur of the image, sigma in [0.3, blur_sigma_max] px
    blur_sigma_max: float = 1.0  # in pixels of the model's image size
    noise: float = 0.0  # additive Gaussian pixel noise, std drawn per image from [0, noise] (images in [-1, 1])
    amplitude: float = 0.1  # profile per-channel gain jitter (log space), fraction
    band_drop: float = 0.1  # probability of zeroing one profile channel
    temporal_crop: float = 0.2  # probability of cropping the profile in time before resampling
    temporal_crop_min: float = 0.8


@dataclass
class DataConfig:
    train: str = "demo_out/data/uto"  # Parquet folder of (unlabelled) paired particles
    val: str = ""  # labelled Parquet folder for the validation gallery k-NN score; "" = none
    image_size: int = 32
    # Gray levels -> model input. "fixed": the paper's 0..255 -> [-1, 1]. "background": the crop's
    # background level (median of the border of the resized crop) maps to 0, values (pixel -
    # background) / 255, so a particle looks the same on a brighter or darker background. On an
    # independently written generator "background" raised image-only k-NN (n = 16) from 67 to 73 %
    # in-domain and from 47 to 63 % across domains, but fused I+P-I+P did not gain (n = 16) and fell
    # ~5 points at n = 4, as profile-only k-NN did; on our generator it was ~1-2 points lower: for
    # image-only retrieval under lighting shifts, not the default.
    image_norm: str = "fixed"
    profile_length: int = 64  # profiles are resampled to this many samples
    # Training rows in a new order every epoch (from ``seed``): files are often ordered by class or
    # time, and in-batch negatives of one class teach little. "global": all rows shuffled (waits for
    # the whole pool to be read each epoch: fine up to ~1e5 rows); "local": shard order shuffled and
    # rows mixed in a buffer of LOCAL_SHUFFLE_BATCHES micro-batches (no wait; for large pools that
    # are not sorted); "none": file order.
    shuffle: str = "global"
    val_max_particles: int = 2000
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    image_encoder: str = "resnet10t"  # any timm model name
    image_kwargs: dict[str, Any] = field(default_factory=dict)
    profile_encoder: str = "cnn"  # registered profile encoder: cnn | lstm | transformer
    profile_kwargs: dict[str, Any] = field(default_factory=dict)
    embed_dim: int = 128
    metadata: bool = True  # append original H, W (image) and length (profile) before the projection
    pretrained_path: str = ""  # local weights file for the image encoder (never a hub download)
    # Pretraining-pool particles whose mean unit embedding is subtracted from every embedding before
    # its final L2 normalisation (xmodal/models/center.py); 0 = no centring.
    center_particles: int = 1024
    # Embed each particle and its mirror along the flow axis (image flipped, profile reversed) and
    # average the two (xmodal/models/views.py): doubles embedding work, never touches training.
    embed_flip: bool = True


@dataclass
class LossConfig:
    name: str = "clip"  # registered loss: clip | siglip | dino
    # Initial scale (1/temperature): CLIP's 1/0.07. The paper starts at e (configs/paper_*.yaml keep
    # it) for 100 GPU epochs; a learnable log-scale moves ~lr per step, so in a short CPU schedule it
    # stays near its start, and at e the softmax over a batch stays too flat to separate particles:
    # 1/0.07 gave +7 points I+P-I+P at n = 16 on the demo data (bench/bench_logit_scale.py).
    logit_scale: float = 1 / 0.07
    learnable_scale: bool = True
    max_logit_scale: float = 100.0
    logit_bias: float = -10.0  # siglip only
    buckets: int = 1  # >1 restricts negatives to sub-batches (the paper's "buckets")
    kwargs: dict[str, Any] = field(default_factory=dict)  # loss-specific extras (e.g. DINO settings)


@dataclass
class OptimConfig:
    name: str = "adamw"  # sgd (Nesterov, the paper's) | adamw
    lr: float = 2e-3
    momentum: float = 0.9
    weight_decay: float = 1e-3
    warmup_epochs: float = 1.0
    epochs: int = 4
    batch_size: int = 128  # global batch, split across workers
    grad_accum: int = 1


@dataclass
class TrainConfig:
    num_workers: int = 2
    use_gpu: bool = False
    # 2 workers x 0.5 on a 2-core laptop leave one CPU for Ray Data's loading tasks (DATA_CPUS in
    # xmodal/train/trainer.py); with 1.0 the first epoch waited forever for data
    cpus_per_worker: float = 0.5
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False
    channels_last: bool = True  # NHWC image activations (CPU and CUDA)
    checkpoint_every: int = 1  # epochs
    log_every: int = 10  # steps
    max_failures: int = 2
    storage_path: str = "runs"
    name: str = ""  # run name; same name resumes
    seed: int = 0


@dataclass
class EvalConfig:
    combos: list[str] = field(default_factory=lambda: ["I-I", "P-P", "I+P-I+P"])
    gallery_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    val_n: int = 4  # gallery size used for the per-epoch validation score
    # gallery draws averaged into that score, which picks the best checkpoint: on 600 particles at
    # n = 4 the score's spread between draws was 1.5-1.7 points with 3 of them, 0.7 with 20 (~0.05 s)
    val_repeats: int = 20
    val_combo: str = "I+P-I+P"  # the score that selects the best checkpoint (and Tune's objective)
    k: int = 3
    repeats: int = 5
    seed: int = 0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    pass


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2's floats without a dot or an exponent sign (``1e-3``,
    ``1.0e3``), which PyYAML (YAML 1.1) reads as text."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text as config files and ``--set`` values are parsed everywhere (``1e-3`` is a float)."""
    return yaml.load(text, Loader=ConfigLoader)


def number(value: Any, where: str) -> float:
    """A finite float from a YAML number or numeric text (e.g. ``"1e-4"`` from a plain YAML 1.1 reader)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected float, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected float, got {value!r}") from None
    if not math.isfinite(out):
        raise ConfigError(f"{where}: expected a finite float, got {value!r}")
    return out


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is float:
        return number(value, where)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    read_as_number = tp is str and isinstance(value, (int, float))
    hint = " (YAML read a number: quote the text as you wrote it)" if read_as_number else ""
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}{hint}")


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown and not where:  # the top level: no section to name
        raise ConfigError(f"unknown section(s) {unknown}; valid sections: {sorted(names)}")
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _field_type(path: list[str]) -> Any:
    """The declared type of the config field at ``path``; None where there is none (free-form kwargs)."""
    tp: Any = Config
    for name in path:
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(name)
    return tp


def parse_override(item: str) -> tuple[list[str], Any]:
    """``optim.lr=0.01`` -> (["optim", "lr"], 0.01); the value is parsed as YAML, except that a
    text field takes the text as written (``train.name=0123`` is "0123", not the octal number 83)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. optim.lr=0.01")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    value = load_yaml(raw) if raw.strip() else ""
    if _field_type(path) is str and not isinstance(value, str):
        value = raw.strip()
    return path, value


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
    """Apply dotted overrides, given as ``["a.b=1", ...]`` or ``{"a.b": 1}``, to a nested dict."""
    items = (
        [parse_override(o) for o in overrides]
        if isinstance(overrides, list)
        else [(k.split("."), v) for k, v in overrides.items()]
    )
    out = copy.deepcopy(data)
    for path, value in items:
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {'.'.join(path)}: '{p}' is not a section")
        node[path[-1]] = value
    return out


def config_from_dict(data: dict[str, Any], where: str = "config") -> Config:
    """Defaults, updated by ``data``; errors are prefixed with ``where`` (usually the file)."""
    merged = _merge(Config().to_dict(), data or {})
    try:
        return _from_dict(Config, merged, "")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_config(
    path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> Config:
    """Load ``path`` (YAML; None = laptop defaults) and apply ``--set`` overrides. The file with
    every override applied is what must be valid (an override may fix a file value); when it is
    not, the error names where the bad value came from: the file, or the override that set it."""
    data: dict[str, Any] = {}
    where = "config"
    if path:
        where = str(path)
        try:
            data = load_yaml(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    if overrides:  # a file value that an override replaces need not be valid on its own
        try:
            return config_from_dict(
                apply_overrides(data, overrides if isinstance(overrides, dict) else list(overrides))
            )
        except Exception:  # any error is reported, with its source, below
            pass  # find the culprit below: the file first, then each override in turn
    cfg = config_from_dict(data, where)  # the file's own errors name the file
    labelled = (
        [(f"--set {o}", [o]) for o in overrides or []]
        if not isinstance(overrides, dict)
        else [(f"override {k}={v!r}", {k: v}) for k, v in overrides.items()]
    )
    # one override at a time, so an error names the one that set the bad value
    for label, override in labelled:
        data = apply_overrides(data, override)
        try:
            cfg = config_from_dict(data)
        except ConfigError as e:
            # "config: optim.lr: expected float" -> "--set optim.lr=abc: expected float"
            key = label.split(" ", 1)[1].split("=", 1)[0].strip()
            message = str(e).removeprefix("config: ").removeprefix(f"{key}: ")
            raise ConfigError(f"{label}: {message}") from None
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
