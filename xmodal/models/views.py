"""Flip averaging: every embedding the model hands out (``embed``) is the normalised mean of the
particle's embedding and that of its mirror image along the flow axis, the image flipped
left-right and the profile reversed in time. It comes before centring (xmodal/models/center.py).

Why: a particle flipped along the flow axis passes the laser in reverse, and the training's paired
flip augmentation (``data.augment.flip``) teaches both encoders that the two are one particle. A
briefly trained encoder has learnt this only in part, so the two views' embeddings differ by
noise; their mean is a steadier point for k-NN. Measured with the same weights on two synthetic
generators: bench/RESULTS.md, "Flip averaging". It doubles the encoders' work at embedding time
and never touches training.

The switch is a buffer, so it travels with the weights: checkpoints written before flip averaging
existed load with it off, and their embeddings stay exactly as they were (an index built from them
stays consistent with new embeddings of the same checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # base imports this module for its annotations
    from xmodal.models.base import Batch


class FlipAverage(nn.Module):
    def __init__(self, enabled: bool):
        super().__init__()
        # float, not bool: DDP broadcasts buffers, and not every collective backend takes bool
        self.register_buffer("enabled", torch.tensor(1.0 if enabled else 0.0))
        self.register_load_state_dict_pre_hook(_off_if_missing)

    @property
    def on(self) -> bool:
        return bool(self.enabled)

    def forward(self, encode: Callable[[Batch], torch.Tensor], batch: Batch, modality: str) -> torch.Tensor:
        """``encode(batch)``: unit rows (B, E); averaged with ``encode`` of the mirrored batch when on."""
        emb = encode(batch)
        if not self.on:
            return emb
        return F.normalize(emb + encode(mirrored(batch, modality)), dim=-1)


def mirrored(batch: Batch, modality: str) -> Batch:
    """``batch`` with ``modality`` mirrored along the flow axis; the other entries are shared."""
    out = dict(batch)
    if modality == "image":
        out["image"] = batch["image"].flip(-1)
    elif modality == "profile":
        out["profile"] = reverse_valid(batch["profile"], batch["profile_mask"].bool())
    else:
        raise ValueError(f"no mirror for modality '{modality}' (image or profile)")
    return out


def reverse_valid(profile: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, C, L) profiles with each row's valid prefix (``mask``, (B, L)) reversed in time; padding
    stays at the end, where the profile encoders require it."""
    n = mask.sum(dim=-1, keepdim=True)  # (B, 1)
    j = torch.arange(profile.shape[-1], device=profile.device)
    index = torch.where(j < n, n - 1 - j, j)  # (B, L)
    return profile.gather(-1, index.unsqueeze(1).expand_as(profile))


def _off_if_missing(module: FlipAverage, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    state_dict.setdefault(prefix + "enabled", torch.zeros_like(module.enabled))
