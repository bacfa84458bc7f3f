"""The cross-modal model: image tower + profile tower + a contrastive loss (clip or siglip)."""

from __future__ import annotations

import torch
from torch import nn

from xmodal.models.base import Batch, XModalModule, eval_mode, require
from xmodal.models.center import EmbeddingCenter
from xmodal.models.heads import ProjectionHead
from xmodal.models.losses import ContrastiveLoss
from xmodal.models.views import FlipAverage

IMAGE_META_DIM = 2  # log1p(H), log1p(W) of the original crop
PROFILE_META_DIM = 1  # log1p(original length)


class CrossModalModel(XModalModule):
    modalities = ("image", "profile")

    def __init__(
        self,
        image_encoder: nn.Module,
        image_dim: int,
        profile_encoder: nn.Module,
        embed_dim: int,
        metadata: bool,
        loss: ContrastiveLoss,
        embed_flip: bool = True,
    ):
        super().__init__()
        self.image_encoder = image_encoder
        self.profile_encoder = profile_encoder
        self.metadata = metadata
        self.image_head = ProjectionHead(image_dim, embed_dim, IMAGE_META_DIM if metadata else 0)
        self.profile_head = ProjectionHead(
            int(profile_encoder.out_dim), embed_dim, PROFILE_META_DIM if metadata else 0
        )
        self.loss = loss
        self.embed_center = EmbeddingCenter({"image": embed_dim, "profile": embed_dim})
        self.embed_flip = FlipAverage(embed_flip)

    def encode_image(self, batch: Batch) -> torch.Tensor:
        meta = require(batch, "image_meta") if self.metadata else None
        return self.image_head(self.image_encoder(require(batch, "image")), meta)

    def encode_profile(self, batch: Batch) -> torch.Tensor:
        meta = require(batch, "profile_meta") if self.metadata else None
        feats = self.profile_encoder(require(batch, "profile"), require(batch, "profile_mask").bool())
        return self.profile_head(feats, meta)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        valid = require(batch, "has_image").bool() & require(batch, "has_profile").bool()
        return self.loss(self.encode_image(batch), self.encode_profile(batch), valid)

    def embed(self, batch: Batch) -> dict[str, torch.Tensor | None]:
        with eval_mode(self):
            return {
                m: self.embed_center(m, self.embed_flip(encode, batch, m))
                for m, encode in (("image", self.encode_image), ("profile", self.encode_profile))
            }

    def after_step(self, progress: float) -> None:
        self.loss.after_step()
