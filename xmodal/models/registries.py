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

import inspect

from xmodal.config import ConfigError
from xmodal.registry import Registry

IMAGE_ENCODERS = Registry("image encoder", modules=("xmodal.models.image",))
PROFILE_ENCODERS = Registry("profile encoder", modules=("xmodal.models.profile",))
LOSSES = Registry("loss", modules=("xmodal.models.losses", "xmodal.models.dino"))

# The config key that names an entry of each registry (model.image_encoder also takes timm names).
REGISTRY_OF_KEY = {
    "model.image_encoder": IMAGE_ENCODERS,
    "model.profile_encoder": PROFILE_ENCODERS,
    "loss.name": LOSSES,
}


def check_name(key: str, name: object) -> None:
    """ConfigError, naming ``key``, the bad name and the valid ones, unless ``name`` is something the
    config key ``key`` can build: shared by the training checks and a sweep's validation so that a bad
    name fails before Ray starts, not in every worker."""
    registry = REGISTRY_OF_KEY[key]
    if key == "model.image_encoder":
        import timm

        if name in registry or (isinstance(name, str) and timm.is_model(name)):
            return
        registered = f" ({', '.join(registry.names())})" if registry.names() else ""
        raise ConfigError(
            f"{key}: unknown image encoder {name!r}; use a timm model name (list them with "
            f"`python -c 'import timm; print(timm.list_models())'`) or a registered one{registered}"
        )
    if name not in registry:
        raise ConfigError(
            f"{key}: unknown {registry.kind} {name!r}; registered: {', '.join(registry.names())}"
        )


def check_profile_kwarg(encoder: str, arg: str, where: str) -> None:
    """ConfigError, prefixed with ``where``, unless the registered profile encoder ``encoder`` takes
    the argument ``arg`` (a ``model.profile_kwargs`` key)."""
    sig = inspect.signature(PROFILE_ENCODERS.get(encoder))
    if arg in sig.parameters or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    valid = [n for n in sig.parameters if n not in ("in_channels", "length")]
    raise ConfigError(
        f"{where}: profile encoder '{encoder}' takes no argument '{arg}' (it takes {', '.join(valid)})"
    )
