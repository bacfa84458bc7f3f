"""``xmodal models``: parameters and forward FLOPs of the image and profile encoders.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add, batch of
one) in eval mode with autograd enabled: without autograd, PyTorch's transformer fast path runs a
fused kernel the counter does not see. The counter has no formula for CPU flash attention, so it
gets the same one as the CUDA attention kernels. LSTMs run as backend-specific fused kernels (mkldnn, cuDNN)
that it does not count either, so their matrix products are added from a forward hook: 2 x tokens
x the weight matrices' sizes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from xmodal.config import ConfigError
from xmodal.data.schema import N_CHANNELS
from xmodal.models.image import IN_CHANS, build_backbone
from xmodal.models.registries import IMAGE_ENCODERS, PROFILE_ENCODERS

# The paper's image encoders and the laptop default.
IMAGE_ENCODER_NAMES: tuple[str, ...] = (
    "resnet10t",
    "resnet18",
    "efficientnet_b0",
    "convnext_femto",
    "vit_tiny_patch16_224",
)


def _cpu_attention_flops(
    query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kw: Any
) -> int:
    return sdpa_flop_count(query, key, value)


_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _lstm_hook(counter: list[int]) -> Any:
    def hook(module: nn.LSTM, inputs: tuple[Any, ...], _out: Any) -> None:
        x = inputs[0]
        tokens = x.data.shape[0] if isinstance(x, PackedSequence) else x.shape[0] * x.shape[1]
        weights = sum(p.numel() for n, p in module.named_parameters() if n.startswith("weight_"))
        counter[0] += 2 * tokens * weights

    return hook


def forward_flops(module: nn.Module, *inputs: torch.Tensor) -> int:
    """Forward FLOPs of ``module(*inputs)``."""
    lstm_flops = [0]
    hooks = [
        m.register_forward_hook(_lstm_hook(lstm_flops)) for m in module.modules() if isinstance(m, nn.LSTM)
    ]
    module.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter, torch.enable_grad():
            module(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return int(counter.get_total_flops()) + lstm_flops[0]


def _row(kind: str, name: str, shape: str, out_dim: int, params: int, flops: int) -> dict[str, Any]:
    return {
        "kind": kind,
        "name": name,
        "input": shape,
        "out_dim": out_dim,
        "params": params,
        "params_m": round(params / 1e6, 3),
        "gflops": round(flops / 1e9, 4),
    }


# the numbers of an image encoder that cannot take the image size
_NO_NUMBERS = {"out_dim": "-", "params": "-", "params_m": "-", "gflops": "-"}


def model_table(
    image_size: int, profile_length: int, image_encoders: tuple[str, ...] | None = None
) -> list[dict[str, Any]]:
    """One row per encoder (every registered profile encoder with default settings, the paper's
    image encoders plus any registered ones): parameters and forward FLOPs for one input. An image
    encoder that cannot take ``image_size`` inputs gets a row saying so, with "-" for its numbers."""
    for option, value in (("--image-size", image_size), ("--profile-length", profile_length)):
        if value < 1:
            raise ConfigError(f"models: {option} must be >= 1 (got {value})")
    rows = []
    names = (
        image_encoders if image_encoders is not None else IMAGE_ENCODER_NAMES + tuple(IMAGE_ENCODERS.names())
    )
    for name in names:
        try:
            model, out_dim = build_backbone(name, image_size)
        except ConfigError:  # feature_width: the model cannot take image_size x image_size inputs
            rows.append({**_row("image", name, f"cannot take {image_size} px", 0, 0, 0), **_NO_NUMBERS})
            continue
        flops = forward_flops(model, torch.zeros(1, IN_CHANS, image_size, image_size))
        rows.append(
            _row("image", name, f"{IN_CHANS}x{image_size}x{image_size}", out_dim, count_params(model), flops)
        )
    for name in PROFILE_ENCODERS.names():
        model = PROFILE_ENCODERS.build(name, in_channels=N_CHANNELS, length=profile_length)
        x = torch.zeros(1, N_CHANNELS, profile_length)
        flops = forward_flops(model, x, torch.ones(1, profile_length, dtype=torch.bool))
        rows.append(
            _row("profile", name, f"{N_CHANNELS}x{profile_length}", model.out_dim, count_params(model), flops)
        )
    return rows
