"""The model zoo's registries: YAML names -> factories.

Kept free of torch imports so that listing names (``xmodal --help``) stays cheap; each registry
imports the module that fills it on first use.

- ``IMAGE_ENCODERS``: extra (non-timm) image backbones, ``factory(in_chans, image_size, **kwargs)``
  returning an ``nn.Module`` that maps (B, in_chans, S, S) to (B, F). Any timm model name passes
  through without registration (see ``image.build_backbone``).
- ``PROFILE_ENCODERS``: ``factory(in_channels, length, **kwargs)`` returning a module with
  ``out_dim`` and ``forward(profile (B, C, L), mask (B, L)) -> (B, out_dim)``.
- ``LOSSES``: ``factory(cfg: LossConfig)`` returning the loss module (clip, siglip, dino).
"""

from __future__ import annotations

from xmodal.registry import Registry

IMAGE_ENCODERS = Registry("image encoder", modules=("xmodal.models.image",))
PROFILE_ENCODERS = Registry("profile encoder", modules=("xmodal.models.profile",))
LOSSES = Registry("loss", modules=("xmodal.models.losses", "xmodal.models.dino"))
