"""Embedding centring: the mean unit embedding of a sample of the pretraining pool, per modality,
subtracted before a final L2 normalisation of every embedding the model hands out (``embed``). The
training loss never sees it.

Why: unit embeddings of a briefly trained model share a large common component, and cosine k-NN
then ranks mostly by it. Subtracting the mean is SimpleShot's centred L2 normalisation (Wang et
al. 2019); per modality it also narrows the gap between image and profile embeddings that the
cross-modal combinations (I-P, P-I, and the joint I+P gallery) search across. The training loop
measures the mean before each validation (every rank embeds a share of the sample), so the validation score that keeps the best
checkpoint already sees centred embeddings (``xmodal.train.validate.update_center``). Measured on
two synthetic generators: bench/RESULTS.md, "Embedding centring".

A zero center leaves embeddings exactly as they were: a model before its first epoch, a run with
``model.center_particles: 0``, and checkpoints written before centring existed (they load with a
zero center).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingCenter(nn.Module):
    """One (E,) buffer per modality, saved in the model's state dict."""

    def __init__(self, dims: Mapping[str, int]):
        super().__init__()
        for modality, dim in dims.items():
            self.register_buffer(modality, torch.zeros(int(dim)))
        self.register_load_state_dict_pre_hook(_zero_if_missing)

    def forward(self, modality: str, emb: torch.Tensor) -> torch.Tensor:
        """``emb``: unit rows (B, E) -> centred unit rows, or ``emb`` itself for a zero center."""
        c = getattr(self, modality)
        if not bool(c.any()):
            return emb
        return F.normalize(emb - c.to(emb.dtype), dim=-1)

    @torch.no_grad()
    def set(self, means: Mapping[str, torch.Tensor]) -> None:
        for modality, mean in means.items():
            getattr(self, modality).copy_(torch.as_tensor(mean))

    @torch.no_grad()
    def reset(self) -> None:
        for buf in self.buffers():
            buf.zero_()


def _zero_if_missing(module: EmbeddingCenter, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    for name, buf in module.named_buffers(recurse=False):
        state_dict.setdefault(prefix + name, torch.zeros_like(buf))
