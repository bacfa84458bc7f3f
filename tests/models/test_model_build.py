from __future__ import annotations

import math

import torch

from xmodal.config import Config, config_from_dict
from xmodal.models.build import build_model


def test_default_config_builds_and_trains_one_step(make_batch) -> None:
    torch.manual_seed(0)
    cfg = Config()
    model = build_model(cfg)
    assert model.modalities == ("image", "profile")
    batch = make_batch(8, cfg.data.image_size, cfg.data.profile_length)
    loss, stats = model(batch)
    assert set(stats) >= {"loss", "logit_scale", "i2p_top1", "p2i_top1"}
    assert all(isinstance(v, float) for v in stats.values())
    assert math.isclose(stats["loss"], loss.item(), rel_tol=1e-6)
    assert math.isclose(stats["logit_scale"], math.e, rel_tol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    emb = model.embed(batch)
    for key in ("image", "profile"):
        assert emb[key].shape == (8, cfg.model.embed_dim)
        torch.testing.assert_close(emb[key].norm(dim=1), torch.ones(8))
    assert model.training  # embed restores the mode it found


def test_rows_missing_a_modality_do_not_change_the_loss(make_batch) -> None:
    torch.manual_seed(0)
    cfg = config_from_dict({"model": {"profile_encoder": "cnn", "profile_kwargs": {"blocks": [1, 1]}}})
    model = build_model(cfg).eval()
    batch = make_batch(6)
    batch["has_image"][1] = False
    batch["has_profile"][4] = False
    full_loss, _ = model(batch)
    keep = torch.tensor([0, 2, 3, 5])
    sub = {k: v[keep] for k, v in batch.items()}
    sub_loss, stats = model(sub)
    torch.testing.assert_close(full_loss, sub_loss)
