"""Image backbones: any timm model (``in_chans=1``, no classifier), or a registered non-timm one.

Weights come only from a local file (``pretrained_path``): timm loads it through its own pretrained
path, which adapts an RGB first layer to one channel, drops a classifier that does not fit and
resamples ViT position embeddings, and never touches the hub because the file overrides every
remote source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from xmodal.config import ConfigError
from xmodal.models.registries import IMAGE_ENCODERS

IN_CHANS = 1  # the instruments' images are grayscale


def _create_timm(
    name: str, image_size: int, pretrained_path: str, dynamic_size: bool, kwargs: dict[str, Any]
) -> nn.Module:
    args: dict[str, Any] = {"in_chans": IN_CHANS, "num_classes": 0, **kwargs}
    if pretrained_path:
        # Every remote source is blanked so that a bad overlay can never fall back to a download.
        args["pretrained"] = True
        args["pretrained_cfg_overlay"] = {"file": pretrained_path, "url": "", "hf_hub_id": "", "source": ""}
    else:
        args["pretrained"] = False
    # ViT-like models fix their patch grid at construction (``img_size``) and interpolate position
    # embeddings only when asked (``dynamic_img_size``); CNNs reject both arguments.
    attempts: list[dict[str, Any]] = []
    if "img_size" not in kwargs:
        if dynamic_size and "dynamic_img_size" not in kwargs:
            attempts.append({"img_size": image_size, "dynamic_img_size": True})
        attempts.append({"img_size": image_size})
    for extra in attempts:
        try:
            return timm.create_model(name, **extra, **args)
        except TypeError as e:
            if not any(k in str(e) for k in extra):
                raise
    return timm.create_model(name, **args)


def build_backbone(
    name: str, image_size: int, pretrained_path: str = "", dynamic_size: bool = False, **kwargs: Any
) -> tuple[nn.Module, int]:
    """The image backbone and its feature width: (B, 1, S, S) -> (B, F).

    ``dynamic_size``: the model must also take other input sizes (DINO's local views)."""
    if pretrained_path and not Path(pretrained_path).is_file():
        raise FileNotFoundError(
            f"model.pretrained_path={pretrained_path!r} does not exist; give a local .safetensors or "
            "timm checkpoint (.pth/.pt/.bin), or set it to '' to start from random weights"
        )
    if name in IMAGE_ENCODERS:
        if pretrained_path:
            raise ValueError(
                f"model.pretrained_path is only supported for timm image encoders, not the registered '{name}'"
            )
        model = IMAGE_ENCODERS.build(name, in_chans=IN_CHANS, image_size=image_size, **kwargs)
    elif timm.is_model(name):
        model = _create_timm(name, image_size, pretrained_path, dynamic_size, kwargs)
    else:
        raise KeyError(
            f"model.image_encoder={name!r} is neither a timm model nor a registered image encoder "
            f"({', '.join(IMAGE_ENCODERS.names()) or 'none registered'}); list timm names with "
            "`python -c 'import timm; print(timm.list_models())'`"
        )
    return model, feature_width(model, name, image_size)


def feature_width(model: nn.Module, name: str, image_size: int) -> int:
    """Width of the model's (B, F) output on S x S inputs; a clear error if it cannot take them."""
    # A dry run is the only width that holds for every timm family (head_hidden_size, pooling
    # variants, registered encoders) and it catches image sizes the model cannot take.
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, IN_CHANS, image_size, image_size))
    except Exception as e:
        raise ConfigError(
            f"image encoder '{name}' cannot take {image_size}x{image_size} inputs (data.image_size): {e}"
        ) from e
    finally:
        model.train(was_training)
    if out.ndim != 2:
        raise ValueError(f"image encoder '{name}' must return (B, F) features, got shape {tuple(out.shape)}")
    return int(out.shape[1])
