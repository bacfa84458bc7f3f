"""Contrastive image-profile losses, correct across data-parallel ranks: ``clip`` and ``siglip``.

Each rank scores its own rows against the batch gathered from every rank with gradients
(open_clip's ``local_loss + gather_with_grad``). The global objective is a mean over all valid
pairs of the concatenated batch, so a rank returns ``world_size * (its rows' share of that mean)``:
DDP averages gradients over ranks, the all-gather backward sums the cross-rank terms, and the
parameter gradients come out equal to a single process on the concatenated batch (tested on two
gloo processes). Rows lacking an image or a profile take no part, neither as anchors nor as
negatives. ``buckets > 1`` restricts negatives to contiguous sub-batches of the global batch
(the paper's buckets).
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F
from torch import nn

from xmodal.config import LossConfig
from xmodal.models.distributed import all_reduce_sum, gather_with_grad
from xmodal.models.registries import LOSSES


class ContrastiveLoss(nn.Module, abc.ABC):
    """Shared machinery: logit scale (stored as log), gathering, pair masks, stats.

    Subclasses define ``pair_loss``: the loss of each of this rank's anchor rows.
    """

    def __init__(self, logit_scale: float, learnable_scale: bool, max_logit_scale: float, buckets: int):
        super().__init__()
        if logit_scale <= 0 or max_logit_scale <= 0:
            raise ValueError(f"loss.logit_scale ({logit_scale}) and loss.max_logit_scale must be > 0")
        if buckets < 1:
            raise ValueError(f"loss.buckets must be >= 1, got {buckets}")
        log_scale = torch.tensor(math.log(logit_scale), dtype=torch.float32)
        if learnable_scale:
            self.logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("logit_scale", log_scale)
        self.max_log_scale = math.log(max_logit_scale)
        self.buckets = buckets

    @abc.abstractmethod
    def pair_loss(
        self, i2p: torch.Tensor, p2i: torch.Tensor, targets: torch.Tensor, pair_ok: torch.Tensor
    ) -> torch.Tensor:
        """Per-row losses (n_local,) from scaled similarities (n_local, N); ``targets`` = the
        column of each row's partner, ``pair_ok`` = pairs allowed to count."""

    def forward(
        self, image: torch.Tensor, profile: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``image``/``profile``: L2-normalised (n, E) embeddings of this rank's rows; ``valid``:
        (n,) bool, rows that have both modalities. Returns the rank's loss and global stats."""
        # Similarities in bf16 would blur the softmax at high logit scales: at least fp32.
        with torch.autocast(device_type=image.device.type, enabled=False):
            dtype = torch.promote_types(image.dtype, torch.float32)
            image, profile = image.to(dtype), profile.to(dtype)
            n, e = image.shape
            packed = torch.cat([image, profile, valid[:, None].to(dtype)], dim=1)
            g = gather_with_grad(packed)
            all_image, all_profile, all_valid = g.rows[:, :e], g.rows[:, e : 2 * e], g.rows[:, -1] > 0.5
            total = g.rows.shape[0]
            targets = torch.arange(n, device=image.device) + g.offset
            columns = torch.arange(total, device=image.device)
            pair_ok = valid[:, None] & all_valid[None, :]
            if self.buckets > 1:
                bucket = columns * self.buckets // total
                pair_ok = pair_ok & (bucket[targets][:, None] == bucket[None, :])
            # Rows that do not count still need one finite logit so that their (discarded) softmax
            # has no NaN to leak into the backward pass.
            pair_ok = pair_ok | ~valid[:, None]
            scale = self.logit_scale.to(dtype).exp()
            i2p = scale * image @ all_profile.T
            p2i = scale * profile @ all_image.T
            per_row = self.pair_loss(i2p, p2i, targets, pair_ok)
            n_valid = all_valid.sum().clamp(min=1)
            share = torch.where(valid, per_row, torch.zeros_like(per_row)).sum() / n_valid
            loss = share * g.world_size
            with torch.no_grad():
                i2p_hit = _top1_hits(i2p, targets, all_valid, valid)
                p2i_hit = _top1_hits(p2i, targets, all_valid, valid)
                sums = all_reduce_sum(torch.stack([share, i2p_hit, p2i_hit]))
        stats = {
            "loss": float(sums[0]),
            "logit_scale": float(scale.detach()),
            "i2p_top1": float(sums[1] / n_valid),
            "p2i_top1": float(sums[2] / n_valid),
        }
        return loss, stats

    @torch.no_grad()
    def after_step(self) -> None:
        """Clamp the scale after each optimizer step, as open_clip does."""
        self.logit_scale.clamp_(max=self.max_log_scale)


def _top1_hits(
    logits: torch.Tensor, targets: torch.Tensor, col_valid: torch.Tensor, row_valid: torch.Tensor
) -> torch.Tensor:
    """How many valid rows rank their own partner first among all valid columns."""
    best = logits.masked_fill(~col_valid[None, :], float("-inf")).argmax(dim=1)
    return ((best == targets) & row_valid).sum().to(logits.dtype)


class ClipLoss(ContrastiveLoss):
    """Symmetric InfoNCE: mean of image->profile and profile->image cross-entropies."""

    def pair_loss(
        self, i2p: torch.Tensor, p2i: torch.Tensor, targets: torch.Tensor, pair_ok: torch.Tensor
    ) -> torch.Tensor:
        rows = torch.arange(i2p.shape[0], device=i2p.device)
        lsm_i2p = i2p.masked_fill(~pair_ok, float("-inf")).log_softmax(dim=1)
        lsm_p2i = p2i.masked_fill(~pair_ok, float("-inf")).log_softmax(dim=1)
        return -(lsm_i2p[rows, targets] + lsm_p2i[rows, targets]) / 2


class SigLipLoss(ContrastiveLoss):
    """Pairwise sigmoid loss: -log sigmoid(z_ij (s <I_i, P_j> + b)), z = +1 for partners, -1
    otherwise, summed over pairs and divided by the number of valid particles (the SigLIP paper)."""

    def __init__(
        self,
        logit_scale: float,
        learnable_scale: bool,
        max_logit_scale: float,
        buckets: int,
        logit_bias: float,
    ):
        super().__init__(logit_scale, learnable_scale, max_logit_scale, buckets)
        self.logit_bias = nn.Parameter(torch.tensor(float(logit_bias)))

    def pair_loss(
        self, i2p: torch.Tensor, p2i: torch.Tensor, targets: torch.Tensor, pair_ok: torch.Tensor
    ) -> torch.Tensor:
        columns = torch.arange(i2p.shape[1], device=i2p.device)
        z = torch.where(columns[None, :] == targets[:, None], 1.0, -1.0)
        pair = -F.logsigmoid(z * (i2p + self.logit_bias.to(i2p.dtype)))
        return torch.where(pair_ok, pair, torch.zeros_like(pair)).sum(dim=1)

    def forward(
        self, image: torch.Tensor, profile: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        loss, stats = super().forward(image, profile, valid)
        stats["logit_bias"] = float(self.logit_bias.detach())
        return loss, stats


def _no_kwargs(cfg: LossConfig) -> None:
    if cfg.kwargs:
        raise ValueError(f"loss.kwargs {sorted(cfg.kwargs)} are not used by loss '{cfg.name}'; remove them")


@LOSSES.register("clip")
def clip(cfg: LossConfig) -> ClipLoss:
    _no_kwargs(cfg)
    return ClipLoss(cfg.logit_scale, cfg.learnable_scale, cfg.max_logit_scale, cfg.buckets)


@LOSSES.register("siglip")
def siglip(cfg: LossConfig) -> SigLipLoss:
    _no_kwargs(cfg)
    return SigLipLoss(cfg.logit_scale, cfg.learnable_scale, cfg.max_logit_scale, cfg.buckets, cfg.logit_bias)
