"""Profile encoders: (B, C, L) pulse shapes + (B, L) validity mask -> (B, out_dim) features.

Every encoder ignores masked samples exactly, so a particle's features do not depend on how far
its batch was padded (tested in eval mode): the CNN zeroes padding before every convolution (what
its own zero padding would have seen) and max-pools over valid samples only, the LSTM packs the
sequences, and the transformer masks padded keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from xmodal.models.registries import PROFILE_ENCODERS


def _masked_conv(conv: nn.Conv1d, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Convolve with padding zeroed; returns the output and its mask (subsampled by the stride)."""
    out = conv(x * mask[:, None, :].to(x.dtype))
    return out, mask[:, :: conv.stride[0]]


class BasicBlock1d(nn.Module):
    """ResNet BasicBlock in 1-D: two 3-tap convolutions and a (projected) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, kernel_size: int):
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv1d(in_ch, out_ch, kernel_size, stride=stride, padding=pad, bias=False)
        self.bn1 = nn.BatchNorm1d(out_ch)
        self.conv2 = nn.Conv1d(out_ch, out_ch, kernel_size, padding=pad, bias=False)
        self.bn2 = nn.BatchNorm1d(out_ch)
        self.act = nn.ReLU(inplace=True)
        self.down: nn.Conv1d | None = None
        self.down_bn: nn.BatchNorm1d | None = None
        if stride != 1 or in_ch != out_ch:
            self.down = nn.Conv1d(in_ch, out_ch, 1, stride=stride, bias=False)
            self.down_bn = nn.BatchNorm1d(out_ch)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, out_mask = _masked_conv(self.conv1, x, mask)
        out = self.act(self.bn1(out))
        out, _ = _masked_conv(self.conv2, out, out_mask)
        out = self.bn2(out)
        if self.down is not None and self.down_bn is not None:
            short, _ = _masked_conv(self.down, x, mask)
            short = self.down_bn(short)
        else:
            short = x
        return self.act(out + short), out_mask


class ProfileCNN(nn.Module):
    """1-D ResNet: a stem convolution, stages of BasicBlocks (stride 2 from the second stage on,
    channels doubling), then a global max pool over the valid samples."""

    def __init__(
        self,
        in_channels: int,
        length: int,
        base_channels: int = 32,
        blocks: Sequence[int] = (2, 2, 2, 2),
        kernel_size: int = 3,
        stem_kernel_size: int = 7,
    ):
        super().__init__()
        if not blocks or any(b < 1 for b in blocks):
            raise ValueError(f"profile cnn: blocks must be a non-empty list of positive counts, got {blocks}")
        self.stem = nn.Conv1d(
            in_channels, base_channels, stem_kernel_size, padding=stem_kernel_size // 2, bias=False
        )
        self.stem_bn = nn.BatchNorm1d(base_channels)
        layers: list[BasicBlock1d] = []
        ch = base_channels
        for stage, n in enumerate(blocks):
            out_ch = base_channels * 2**stage
            for i in range(n):
                layers.append(BasicBlock1d(ch, out_ch, 2 if stage > 0 and i == 0 else 1, kernel_size))
                ch = out_ch
        self.blocks = nn.ModuleList(layers)
        self.out_dim = ch

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x, mask = _masked_conv(self.stem, x, mask)
        x = torch.relu(self.stem_bn(x))
        for block in self.blocks:
            x, mask = block(x, mask)
        pooled = x.masked_fill(~mask[:, None, :], float("-inf")).amax(dim=-1)
        # A row without any valid sample (no profile) would pool to -inf; give it zeros instead.
        return torch.where(mask.any(dim=1, keepdim=True), pooled, torch.zeros_like(pooled))


def _prefix_lengths(mask: torch.Tensor) -> torch.Tensor:
    lengths = mask.sum(dim=1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    if not torch.equal(mask, positions[None, :] < lengths[:, None]):
        raise ValueError("profile_mask must mark a prefix of each row valid (padding only at the end)")
    return lengths


class ProfileLSTM(nn.Module):
    """Bidirectional LSTM over packed sequences; features are the last layer's final forward and
    backward hidden states."""

    def __init__(
        self, in_channels: int, length: int, hidden: int = 128, layers: int = 2, dropout: float = 0.0
    ):
        super().__init__()
        self.lstm = nn.LSTM(
            in_channels,
            hidden,
            num_layers=layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.out_dim = 2 * hidden

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lengths = _prefix_lengths(mask)
        # Packing needs length >= 1; rows without a profile are zeroed below.
        packed = pack_padded_sequence(
            x.transpose(1, 2), lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        _, (h, _) = self.lstm(packed)
        feats = torch.cat([h[-2], h[-1]], dim=1)
        return feats * (lengths > 0)[:, None].to(feats.dtype)


class ProfileTransformer(nn.Module):
    """Pre-norm transformer encoder over per-sample tokens with a CLS token and learned positions;
    padded samples are excluded as attention keys."""

    def __init__(
        self,
        in_channels: int,
        length: int,
        width: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        max_length: int | None = None,
    ):
        super().__init__()
        if width % heads:
            raise ValueError(f"profile transformer: width {width} must be divisible by heads {heads}")
        self.max_length = max_length or length
        self.embed = nn.Linear(in_channels, width)
        self.cls = nn.Parameter(torch.zeros(width))
        self.pos = nn.Parameter(torch.randn(self.max_length + 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width,
            heads,
            int(width * mlp_ratio),
            dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out_dim = width

    def no_weight_decay(self) -> set[str]:
        return {"cls", "pos"}

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, _, length = x.shape
        if length > self.max_length:
            raise ValueError(
                f"profile transformer: got {length} samples but positions exist for {self.max_length}; "
                "set data.profile_length or model.profile_kwargs.max_length"
            )
        tokens = torch.cat([self.cls.expand(b, 1, -1), self.embed(x.transpose(1, 2))], dim=1)
        tokens = tokens + self.pos[: length + 1]
        keep = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=mask.device), mask], dim=1)
        out = self.encoder(tokens, src_key_padding_mask=~keep)
        return self.norm(out[:, 0])


PROFILE_ENCODERS.register("cnn")(ProfileCNN)
PROFILE_ENCODERS.register("lstm")(ProfileLSTM)
PROFILE_ENCODERS.register("transformer")(ProfileTransformer)
