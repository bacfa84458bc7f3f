"""Projection heads: encoder features (+ optional metadata) -> L2-normalised embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """Linear projection to the shared embedding space, CLIP-style.

    ``meta_dim`` > 0 appends the metadata features (original image H, W or profile length, as the
    paper does) to the encoder features before projecting.
    """

    def __init__(self, in_dim: int, embed_dim: int, meta_dim: int = 0):
        super().__init__()
        self.meta_dim = meta_dim
        self.proj = nn.Linear(in_dim + meta_dim, embed_dim)

    def forward(self, features: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        if self.meta_dim:
            if meta is None or meta.shape[-1] != self.meta_dim:
                got = None if meta is None else tuple(meta.shape)
                raise ValueError(f"projection head expects metadata of width {self.meta_dim}, got {got}")
            features = torch.cat([features, meta.to(features.dtype)], dim=1)
        return F.normalize(self.proj(features), dim=-1)
