"""Encoders, heads, losses and the DINO baseline; ``build_model(cfg)`` in ``xmodal.models.build``.

Importing this package does not import torch (the registries fill themselves lazily).
"""

from xmodal.models.registries import IMAGE_ENCODERS, LOSSES, PROFILE_ENCODERS

__all__ = ["IMAGE_ENCODERS", "LOSSES", "PROFILE_ENCODERS"]
