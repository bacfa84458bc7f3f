"""The small-map depthwise and whole-map dense paths compute exactly ``F.conv2d`` (values and
gradients), are taken only where they are meant to be, and leave parameters and state dicts
untouched."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from xmodal.models import cpu_kernels
from xmodal.models.cpu_kernels import (
    WholeMapConv2d,
    depthwise_small_map,
    use_small_map_kernels,
    whole_map_conv,
)


def _grads(fn, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, g: torch.Tensor):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    y = fn(*leaves[:2], leaves[2] if b is not None else None)
    y.backward(g)
    return [y.detach()] + [t.grad for t in leaves]


def _assert_same(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    """Output and gradients (input, weight, bias) equal to float64 rounding."""
    for name, a, r in zip(["output", "grad input", "grad weight", "grad bias"], ours, ref):
        assert a.shape == r.shape, name
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12, msg=name)


def _spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple[int, int]]:
    """Record the map size of every call to the fast path ``cpu_kernels.<name>``."""
    calls: list[tuple[int, int]] = []
    real = getattr(cpu_kernels, name)

    def spy(x, *args):
        calls.append(tuple(x.shape[-2:]))
        return real(x, *args)

    monkeypatch.setattr(cpu_kernels, name, spy)
    return calls


@pytest.mark.parametrize(
    ("c", "h", "w", "k", "stride", "pad", "bias"),
    [
        (5, 2, 2, 3, 1, 1, False),
        (7, 4, 4, 5, 1, 2, True),
        (6, 4, 4, 5, 2, 2, False),  # stride 2, timm's symmetric padding for k=5
        (4, 3, 5, 3, 2, 1, True),  # odd, non-square map
        (3, 4, 4, 7, 1, 3, False),  # ConvNeXt's 7x7
        (3, 8, 8, 3, 1, 0, True),  # no padding; a map larger than the fast path takes
        (2, 1, 1, 3, 1, 1, False),
    ],
)
def test_matches_conv2d_values_and_gradients(c, h, w, k, stride, pad, bias) -> None:
    g = torch.Generator().manual_seed(c * 100 + h * 10 + k)
    x = torch.randn(3, c, h, w, generator=g, dtype=torch.float64)
    wt = torch.randn(c, 1, k, k, generator=g, dtype=torch.float64)
    b = torch.randn(c, generator=g, dtype=torch.float64) if bias else None
    ref_y = F.conv2d(x, wt, b, stride, pad, groups=c)
    gy = torch.randn(ref_y.shape, generator=g, dtype=torch.float64)

    ours = _grads(lambda x, w, b: depthwise_small_map(x, w, b, stride, pad), x, wt, b, gy)
    ref = _grads(lambda x, w, b: F.conv2d(x, w, b, stride, pad, groups=c), x, wt, b, gy)
    _assert_same(ours, ref)


@pytest.mark.parametrize(
    ("cin", "cout", "h", "w", "k", "stride", "pad", "bias"),
    [
        (5, 4, 1, 1, 3, 1, 1, False),  # ResNet's last stage at 32 px
        (3, 6, 2, 2, 3, 2, 1, True),  # its stride-2 entry from 2x2
        (2, 3, 1, 1, 7, 2, 3, True),  # a 7x7 stem on one pixel
        (4, 2, 3, 3, 3, 1, 0, False),  # a kernel exactly covering the map, no padding
        (2, 2, 1, 3, (3, 5), 1, (1, 1), True),  # non-square map, kernel and padding
    ],
)
def test_whole_map_matches_conv2d_values_and_gradients(cin, cout, h, w, k, stride, pad, bias) -> None:
    g = torch.Generator().manual_seed(cin * 100 + cout * 10 + h)
    kh, kw = (k, k) if isinstance(k, int) else k
    pads = (pad, pad) if isinstance(pad, int) else pad
    x = torch.randn(3, cin, h, w, generator=g, dtype=torch.float64)
    wt = torch.randn(cout, cin, kh, kw, generator=g, dtype=torch.float64)
    b = torch.randn(cout, generator=g, dtype=torch.float64) if bias else None
    ref_y = F.conv2d(x, wt, b, stride, pads)
    assert ref_y.shape[-2:] == (1, 1)
    gy = torch.randn(ref_y.shape, generator=g, dtype=torch.float64)

    ours = _grads(lambda x, w, b: whole_map_conv(x, w, b, pads), x, wt, b, gy)
    ref = _grads(lambda x, w, b: F.conv2d(x, w, b, stride, pads), x, wt, b, gy)
    _assert_same(ours, ref)


def test_whole_map_path_only_where_the_window_covers_the_input(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(monkeypatch, "whole_map_conv")
    for stride in (1, 2):
        conv = nn.Conv2d(4, 5, 3, stride=stride, padding=1)
        assert use_small_map_kernels(conv) == 1 and type(conv) is WholeMapConv2d
        for size in (1, 2, 3, 4):
            x = torch.randn(2, 4, size, size)
            torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, stride, 1))
    # one output pixel: stride 1 only from a 1x1 map; stride 2 from 1x1 and 2x2 (3x3 and 4x4 give 2x2)
    assert calls == [(1, 1), (1, 1), (2, 2)]


def test_channels_last_gives_the_same_values_and_gradients_and_stays_channels_last() -> None:
    torch.manual_seed(0)
    cl = torch.channels_last
    x, wt, b = torch.randn(3, 8, 4, 4, dtype=torch.float64), torch.randn(8, 1, 5, 5, dtype=torch.float64), None
    g = torch.randn(3, 8, 4, 4, dtype=torch.float64)

    def ours(x, w, b):
        return depthwise_small_map(x, w, b, 1, 2)

    def ref(x, w, b):
        return F.conv2d(x, w, b, 1, 2, groups=8)

    got = _grads(ours, x.contiguous(memory_format=cl), wt, b, g.contiguous(memory_format=cl))
    want = _grads(ref, x, wt, b, g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
    y = depthwise_small_map(x.contiguous(memory_format=cl), wt, None, 1, 2)
    assert y.is_contiguous(memory_format=cl)  # the next layer gets the layout the model runs in


def test_only_plain_depthwise_convs_are_switched() -> None:
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, groups=4),  # depthwise: switched
        nn.Conv2d(4, 8, 3, padding=1, groups=4),  # grouped, not depthwise
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8),  # dilated
        nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect"),
        nn.Conv2d(8, 8, 3, padding="same", groups=8),  # string padding
        nn.Conv2d(8, 8, (3, 1), padding=(1, 0), groups=8),  # non-square kernel
        nn.Conv2d(8, 8, 1),  # pointwise: left alone
        timm.layers.Conv2dSame(8, 8, 3, groups=8),  # a subclass with its own forward
        nn.Conv2d(8, 4, 3, padding=1),  # dense: the whole-map path
        timm.layers.Conv2dSame(4, 4, 3),
    )
    assert use_small_map_kernels(model) == 2
    assert [type(m).__name__ for m in model] == ["SmallMapDepthwiseConv2d"] + ["Conv2d"] * 6 + [
        "Conv2dSame",
        "WholeMapConv2d",
        "Conv2dSame",
    ]


def test_fast_path_only_for_maps_no_larger_than_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(monkeypatch, "depthwise_small_map")
    conv = nn.Conv2d(6, 6, 5, padding=2, groups=6)
    use_small_map_kernels(conv)
    for size in (2, 4, 5, 6, 8):
        x = torch.randn(2, 6, size, size)
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, 1, 2, groups=6))
    assert calls == [(2, 2), (4, 4), (5, 5)]  # 36 and 64 pixels > 25 taps: the stock kernel


@pytest.mark.parametrize(
    ("name", "size"),
    # 64 px: 2x2 and 4x4 maps in the last stages; resnet10t at 32 px ends on 1x1 maps
    [("efficientnet_b0", 64), ("convnext_femto", 64), ("resnet10t", 32)],
)
def test_switched_timm_model_is_the_same_function(name: str, size: int) -> None:
    torch.manual_seed(0)
    stock = timm.create_model(name, in_chans=1, num_classes=0).double()
    fast = copy.deepcopy(stock)
    n = use_small_map_kernels(fast)
    assert n > 0
    assert list(fast.state_dict()) == list(stock.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), stock.state_dict().values()))

    x = torch.randn(3, 1, size, size, dtype=torch.float64)
    outs = []
    for model in (stock, fast):
        model.train()
        y = model(x)
        y.square().sum().backward()
        outs.append((y.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-10, atol=1e-10)
    for a, b in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)

    # Checkpoints move both ways: a stock model loads the switched one's weights and vice versa.
    stock.load_state_dict(fast.state_dict())
    fast.load_state_dict(stock.state_dict())
