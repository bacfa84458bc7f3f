"""``build_model(cfg)``: the one entry point from a run config to a trainable ``XModalModule``."""

from __future__ import annotations

from xmodal.config import Config
from xmodal.data.schema import N_CHANNELS
from xmodal.models.base import XModalModule
from xmodal.models.crossmodal import CrossModalModel
from xmodal.models.dino import DinoLoss, DinoModel
from xmodal.models.image import build_backbone
from xmodal.models.losses import ContrastiveLoss
from xmodal.models.registries import LOSSES, PROFILE_ENCODERS


def build_model(cfg: Config, pretrained: bool = True) -> XModalModule:
    """The model named by ``cfg.model`` and ``cfg.loss``: cross-modal for clip/siglip, the
    image-only DINO baseline for dino (profile settings unused).

    ``pretrained=False`` for a model whose state dict is loaded next (a checkpoint): the initial
    weights of ``model.pretrained_path`` would only be overwritten, and that file may be gone."""
    m = cfg.model
    loss = LOSSES.build(cfg.loss.name, cfg=cfg.loss)
    dino = isinstance(loss, DinoLoss)
    image_encoder, image_dim = build_backbone(
        # DINO's local views are smaller than the global ones: ViTs must take any size.
        m.image_encoder,
        cfg.data.image_size,
        m.pretrained_path if pretrained else "",
        dynamic_size=dino,
        **m.image_kwargs,
    )
    if dino:
        return DinoModel(image_encoder, image_dim, cfg.data.image_size, loss, m.embed_flip)
    if not isinstance(loss, ContrastiveLoss):
        raise TypeError(
            f"loss '{cfg.loss.name}' built a {type(loss).__name__}, which no model here can train"
        )
    try:
        profile_encoder = PROFILE_ENCODERS.build(
            m.profile_encoder, in_channels=N_CHANNELS, length=cfg.data.profile_length, **m.profile_kwargs
        )
    except TypeError as e:
        raise TypeError(f"model.profile_kwargs for '{m.profile_encoder}': {e}") from e
    return CrossModalModel(
        image_encoder, image_dim, profile_encoder, m.embed_dim, m.metadata, loss, m.embed_flip
    )


def trained_modalities(cfg: Config) -> tuple[str, ...]:
    """The modalities the loss trains on: both for the contrastive losses, the image only for DINO
    (whose training rows then need an image, not a profile). Builds the loss, which is cheap."""
    loss = LOSSES.build(cfg.loss.name, cfg=cfg.loss)
    return ("image", "profile") if isinstance(loss, ContrastiveLoss) else DinoModel.modalities
