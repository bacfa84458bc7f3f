"""Per-epoch validation on rank 0: the embedding center from a sample of the pretraining pool,
then validation loss, in-batch retrieval, and the gallery k-NN score (the same protocol code as
``xmodal benchmark``) on a small labelled set."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from xmodal.config import Config
from xmodal.eval.embed import embed_arrays, embedding_set
from xmodal.eval.protocol import gallery_score
from xmodal.models.distributed import local_only

VAL_CHUNK = 256


@torch.no_grad()
def update_center(
    module: torch.nn.Module, sample: dict[str, np.ndarray], device: torch.device
) -> dict[str, float]:
    """Set ``module.embed_center`` to the mean unit embedding, per modality, of the ``sample`` rows
    that have that modality (embedded uncentred, in eval mode). Returns each mean's norm: 0 for
    embeddings spread evenly around the origin, near 1 when they all point one way."""
    module.embed_center.reset()
    emb = embed_arrays(module, sample, device, VAL_CHUNK)
    means = {}
    for modality, e in emb.items():
        valid = np.asarray(sample[f"has_{modality}"], bool)
        if e is not None and valid.any():
            means[modality] = torch.as_tensor(e[valid].astype(np.float64).mean(axis=0), dtype=torch.float32)
    module.embed_center.set(means)
    return {f"center_norm_{m}": float(v.norm()) for m, v in means.items()}


@torch.no_grad()
def validate(
    module: torch.nn.Module, val: dict[str, np.ndarray], cfg: Config, device: torch.device
) -> dict[str, Any]:
    was_training = module.training
    module.eval()
    out: dict[str, Any] = {}
    emb = embed_arrays(module, val, device, VAL_CHUNK)
    es = embedding_set(val, emb)
    combos = [
        c
        for c in dict.fromkeys(["I-I", "P-P", "I+P-I+P", cfg.eval.val_combo])
        if "P" not in c or "profile" in module.modalities
    ]
    for combo in combos:
        out[f"val_{combo}"] = gallery_score(
            es, combo=combo, n=cfg.eval.val_n, k=cfg.eval.k, repeats=cfg.eval.val_repeats, seed=cfg.eval.seed
        )
    out["val_combo"] = cfg.eval.val_combo if cfg.eval.val_combo in combos else "I-I"
    out["val_score"] = out[f"val_{out['val_combo']}"]
    if "profile" in module.modalities:
        losses, stats = [], {}
        n = len(val["has_image"])
        for s in range(0, n - 1, VAL_CHUNK):
            chunk = {
                k: torch.as_tensor(val[k][s : s + VAL_CHUNK]).to(device)
                for k in (
                    "image",
                    "image_meta",
                    "profile",
                    "profile_mask",
                    "profile_meta",
                    "has_image",
                    "has_profile",
                )
            }
            if chunk["image"].shape[0] < 2:
                continue
            with local_only():  # the other ranks are not in this forward pass
                loss, st = module(chunk)
            losses.append(float(loss))
            for k in ("i2p_top1", "p2i_top1"):
                if k in st:
                    stats.setdefault(k, []).append(float(st[k]))
        if losses:
            out["val_loss"] = float(np.mean(losses))
            out.update({f"val_{k}": float(np.mean(v)) for k, v in stats.items()})
    module.train(was_training)
    return out
