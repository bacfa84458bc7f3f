"""``XModalModule``: the contract every trainable model honours (docs/INTERFACES.md).

The training loop only ever calls ``forward`` (the whole objective, so DDP sees every parameter),
``after_step``, ``param_groups`` and ``embed``; the cross-modal model and the DINO baseline differ
behind it.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from xmodal.models.center import EmbeddingCenter
from xmodal.models.views import FlipAverage

Batch = Mapping[str, torch.Tensor]


def require(batch: Batch, key: str) -> torch.Tensor:
    """``batch[key]`` with an error that says what the model needs and what it got."""
    try:
        return batch[key]
    except KeyError:
        raise KeyError(
            f"model batch has no '{key}' (keys: {sorted(batch)}); see 'Model batch' in docs/INTERFACES.md"
        ) from None


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for the duration, restoring the previous mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


class XModalModule(nn.Module, abc.ABC):
    modalities: tuple[str, ...] = ()
    embed_center: EmbeddingCenter  # applied by ``embed``; set by the training loop
    embed_flip: FlipAverage  # applied by ``embed`` before centring; travels with the weights

    @abc.abstractmethod
    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The training objective on one (per-rank) batch and its stats as python floats."""

    @abc.abstractmethod
    def embed(self, batch: Batch) -> dict[str, torch.Tensor | None]:
        """L2-normalised (B, E) embeddings per modality (None for a modality the model lacks),
        averaged with the mirrored particle's by ``embed_flip`` (xmodal/models/views.py), then
        centred by ``embed_center`` (xmodal/models/center.py), computed in eval mode. Rows whose
        ``has_image``/``has_profile`` is False get an embedding of the zero input: the caller must
        treat them as missing."""

    @abc.abstractmethod
    def after_step(self, progress: float) -> None:
        """Called after every optimizer step; ``progress`` in [0, 1] is the fraction of training done."""

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Two optimizer groups: decayed weights, and the rest without decay (logit scale and
        bias, norm and bias vectors, and whatever a submodule lists in timm's ``no_weight_decay()``
        convention such as position embeddings and CLS tokens)."""
        skip: set[str] = set()
        for prefix, module in self.named_modules():
            listed = getattr(module, "no_weight_decay", None)
            if callable(listed):
                skip.update(f"{prefix}.{n}" if prefix else n for n in listed())
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]
