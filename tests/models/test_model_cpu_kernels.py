"""The small-map depthwise path computes exactly ``F.conv2d`` (values and gradients), is taken only
where it is meant to be, and leaves parameters and state dicts untouched."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from xmodal.models import cpu_kernels
from xmodal.models.cpu_kernels import SmallMapDepthwiseConv2d, depthwise_small_map, use_small_map_depthwise


def _grads(fn, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, g: torch.Tensor):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    y = fn(*leaves[:2], leaves[2] if b is not None else None)
    y.backward(g)
    return [y.detach()] + [t.grad for t in leaves]


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
    for name, a, r in zip(["output", "grad input", "grad weight", "grad bias"], ours, ref):
        assert a.shape == r.shape, name
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12, msg=name)


def test_channels_last_input_gives_the_same_result() -> None:
    x = torch.randn(2, 8, 4, 4)
    wt = torch.randn(8, 1, 5, 5)
    ours = depthwise_small_map(x.contiguous(memory_format=torch.channels_last), wt, None, 1, 2)
    torch.testing.assert_close(ours, F.conv2d(x, wt, None, 1, 2, groups=8), rtol=1e-5, atol=1e-5)


def test_only_plain_depthwise_convs_are_switched() -> None:
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, groups=4),  # depthwise: switched
        nn.Conv2d(4, 8, 3, padding=1, groups=4),  # grouped, not depthwise
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8),  # dilated
        nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect"),
        nn.Conv2d(8, 8, 3, padding="same", groups=8),  # string padding
        nn.Conv2d(8, 8, (3, 1), padding=(1, 0), groups=8),  # non-square kernel
        nn.Conv2d(8, 8, 1),
        timm.layers.Conv2dSame(8, 8, 3, groups=8),  # a subclass with its own forward
    )
    assert use_small_map_depthwise(model) == 1
    assert [type(m) is SmallMapDepthwiseConv2d for m in model] == [True] + [False] * 7


def test_fast_path_only_for_maps_no_larger_than_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    real = cpu_kernels.depthwise_small_map

    def spy(x, *args):
        calls.append(tuple(x.shape[-2:]))
        return real(x, *args)

    monkeypatch.setattr(cpu_kernels, "depthwise_small_map", spy)
    conv = nn.Conv2d(6, 6, 5, padding=2, groups=6)
    use_small_map_depthwise(conv)
    for size in (2, 4, 5, 6, 8):
        x = torch.randn(2, 6, size, size)
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, 1, 2, groups=6))
    assert calls == [(2, 2), (4, 4), (5, 5)]  # 36 and 64 pixels > 25 taps: the stock kernel


@pytest.mark.parametrize("name", ["efficientnet_b0", "convnext_femto"])
def test_switched_timm_model_is_the_same_function(name: str) -> None:
    torch.manual_seed(0)
    stock = timm.create_model(name, in_chans=1, num_classes=0).double()
    fast = copy.deepcopy(stock)
    n = use_small_map_depthwise(fast)
    assert n > 0
    assert list(fast.state_dict()) == list(stock.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), stock.state_dict().values()))

    x = torch.randn(3, 1, 64, 64, dtype=torch.float64)  # 64 px: 2x2 and 4x4 maps in the last stages
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
