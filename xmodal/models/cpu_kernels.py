"""Faster CPU convolutions for small feature maps (same function, same weights).

At the 32-64 px images CPU training uses, the last stages of EfficientNet/MobileNet/ConvNeXt run
depthwise 3x3-7x7 convolutions on 2x2 and 4x4 maps. PyTorch's CPU kernels (oneDNN and the native
depthwise path) take 15-40 ms for the backward of one such layer at batch 32, ~20x above its
arithmetic; measured on efficientnet_b0 at 64 px they were ~30 % of a training step
(`bench/bench_train.py`, `bench/RESULTS.md`).

Per channel, a depthwise convolution is a (Ho*Wo x H*W) matrix gathered from the kernel taps. When
the map has no more pixels than the kernel has taps (H*W <= k*k: 2x2 and 4x4 maps for 5x5 and 7x7
kernels, 2x2 for 3x3), that matrix costs no more multiply-adds than the convolution itself and the
whole layer is one batched matmul over channels forward and two backward: 4-15x faster than
``F.conv2d`` on those layers here. On larger maps and on any other device the module is exactly
``nn.Conv2d``.

Dense convolutions whose output is a single pixel and whose window covers the whole input (the last
ResNet stage at 32 px: 3x3 convolutions on 1x1 maps, and the stride-2 one from 2x2) multiply mostly
padding: only the taps over the input matter, so the layer is a linear map of the flattened input
with the cropped kernel. oneDNN computes all nine taps; measured per layer here (batch 64, 1
thread, forward + backward) 3.6x faster on the 1x1 map and 1.6x on the stride-2 one, ~9 % of a
resnet10t training step at 32 px.

The parameters, their names and the state dict do not change, so checkpoints move freely between
these and plain ``nn.Conv2d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_INDEX_CACHE: dict[tuple[int, ...], torch.Tensor] = {}


def _out_size(n: int, k: int, stride: int, pad: int) -> int:
    return (n + 2 * pad - k) // stride + 1


def _tap_index(h: int, w: int, k: int, stride: int, pad: int) -> torch.Tensor:
    """(Ho*Wo, H*W) index of the kernel tap joining each output to each input pixel; k*k where
    the input is out of the output's window (a zero appended to the flattened kernel)."""
    key = (h, w, k, stride, pad)
    idx = _INDEX_CACHE.get(key)
    if idx is None:
        ho, wo = _out_size(h, k, stride, pad), _out_size(w, k, stride, pad)
        a = torch.arange(ho).view(ho, 1, 1, 1)
        b = torch.arange(wo).view(1, wo, 1, 1)
        i = torch.arange(h).view(1, 1, h, 1) - a * stride + pad
        j = torch.arange(w).view(1, 1, 1, w) - b * stride + pad
        inside = (i >= 0) & (i < k) & (j >= 0) & (j < k)
        idx = torch.where(inside, i * k + j, k * k).reshape(ho * wo, h * w)
        _INDEX_CACHE[key] = idx
    return idx


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: a channels-last gradient reaching
    the batched matmul's backward as a strided (C, N, Ho*Wo) view sends it to a per-matrix loop
    (~3x slower for the whole layer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return g.contiguous()


def depthwise_small_map(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, pad: int
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, pad, groups=C)`` for a square kernel, as a batched
    per-channel matmul. Any map size is correct; it is only faster on small maps."""
    cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    x = x.contiguous()
    n, c, h, w = x.shape
    k = weight.shape[-1]
    idx = _tap_index(h, w, k, stride, pad).to(x.device)
    ho, wo = _out_size(h, k, stride, pad), _out_size(w, k, stride, pad)
    taps = torch.cat([weight.reshape(c, k * k), weight.new_zeros(c, 1)], dim=1)
    mat = taps[:, idx]  # (C, Ho*Wo, H*W)
    y = torch.matmul(x.reshape(n, c, h * w).transpose(0, 1), mat.transpose(1, 2))  # (C, N, Ho*Wo)
    y = _ContiguousGrad.apply(y)
    y = y.transpose(0, 1).reshape(n, c, ho, wo)
    if cl:
        y = y.contiguous(memory_format=torch.channels_last)
    return y if bias is None else y + bias.view(1, c, 1, 1)


class SmallMapDepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` (depthwise) that takes the matmul path on CPU for maps of at most k*k pixels."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # Measured per layer (batch 32, 1 thread, forward + backward, AVX2): 5x5 on 4x4 maps 3-7x
        # faster, 7x7 on 4x4 7-10x; 5x5 on 8x8 (64 > 25 taps) 1.2-2x slower, hence the k*k bound.
        if x.device.type == "cpu" and x.dim() == 4 and x.shape[-2] * x.shape[-1] <= self.kernel_size[0] ** 2:
            return depthwise_small_map(x, weight, bias, self.stride[0], self.padding[0])
        return super()._conv_forward(x, weight, bias)


def whole_map_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pad: tuple[int, int]
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, pad)`` (groups 1) where the output is one pixel whose
    window covers all of ``x``: the input flattened times the kernel cropped to the input."""
    n, _, h, w = x.shape
    taps = weight[:, :, pad[0] : pad[0] + h, pad[1] : pad[1] + w]
    y = F.linear(x.reshape(n, -1), taps.reshape(weight.shape[0], -1), bias)
    return y.view(n, -1, 1, 1)


def _whole_map(h: int, w: int, kernel: tuple[int, ...], stride: tuple[int, ...], pad: tuple[int, ...]) -> bool:
    """One output pixel whose window holds every input pixel (so every cut tap sees padding only)."""
    return all(
        _out_size(n, k, s, p) == 1 and p + n <= k for n, k, s, p in zip((h, w), kernel, stride, pad)
    )


class WholeMapConv2d(nn.Conv2d):
    """``nn.Conv2d`` (groups 1) that takes the linear path on CPU where its output is one pixel
    whose window covers the whole input."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (
            x.device.type == "cpu"
            and x.dim() == 4
            and _whole_map(x.shape[-2], x.shape[-1], self.kernel_size, self.stride, self.padding)
        ):
            return whole_map_conv(x, weight, bias, self.padding)
        return super()._conv_forward(x, weight, bias)


def _plain(m: nn.Module) -> bool:
    # Subclasses of nn.Conv2d (timm's TF-"same" padding convs, ...) have their own forward.
    return (
        type(m) is nn.Conv2d
        and m.dilation == (1, 1)
        and isinstance(m.padding, tuple)
        and m.padding_mode == "zeros"
    )


def _depthwise(m: nn.Conv2d) -> bool:
    return (
        m.groups == m.in_channels == m.out_channels
        and m.kernel_size[0] == m.kernel_size[1]
        and m.stride[0] == m.stride[1]
        and m.padding[0] == m.padding[1]
    )


def use_small_map_kernels(model: nn.Module) -> int:
    """Switch the plain ``nn.Conv2d`` layers of ``model`` in place: depthwise ones to
    ``SmallMapDepthwiseConv2d``, dense ones (groups 1, kernel larger than 1x1) to
    ``WholeMapConv2d``; returns how many were switched."""
    n = 0
    for m in model.modules():
        if not _plain(m):
            continue
        if _depthwise(m):
            # A class swap (as torch.nn.utils.parametrize does) keeps the parameter objects, hooks
            # and state-dict names; the subclasses add no state.
            m.__class__ = SmallMapDepthwiseConv2d
        elif m.groups == 1 and m.kernel_size != (1, 1):
            m.__class__ = WholeMapConv2d
        else:
            continue
        n += 1
    return n
