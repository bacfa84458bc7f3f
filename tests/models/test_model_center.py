"""Embedding centring (xmodal/models/center.py): the formula, both models, old checkpoints, and the
training loop's center against a plain mean."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xmodal.config import config_from_dict
from xmodal.models.build import build_model
from xmodal.models.center import EmbeddingCenter
from xmodal.train.validate import update_center

SMALL = {"data": {"image_size": 32, "profile_length": 32}, "model": {"embed_dim": 16}}
DINO = {**SMALL, "loss": {"name": "dino", "kwargs": {"out_dim": 32, "hidden_dim": 16, "n_local": 0}}}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_center_is_the_formula_and_zero_is_the_identity() -> None:
    rng = np.random.default_rng(0)
    emb = torch.as_tensor(_unit(rng.normal(size=(5, 4))), dtype=torch.float32)
    center = EmbeddingCenter({"image": 4})
    assert center("image", emb) is emb  # zero: untouched, not re-normalised
    c = rng.normal(size=4) * 0.3
    center.set({"image": torch.as_tensor(c)})
    np.testing.assert_allclose(center("image", emb).numpy(), _unit(emb.double().numpy() - c), atol=1e-6)
    center.reset()
    assert center("image", emb) is emb


@pytest.mark.parametrize("cfg", [SMALL, DINO], ids=["crossmodal", "dino"])
def test_models_embed_centred_and_old_state_dicts_load_uncentred(cfg, make_batch) -> None:
    torch.manual_seed(0)
    model = build_model(config_from_dict(cfg))
    batch = make_batch(6, 32, 32)
    plain = model.embed(batch)
    means = {m: e.mean(dim=0) for m, e in plain.items() if e is not None}
    model.embed_center.set(means)
    centred = model.embed(batch)
    for m, e in plain.items():
        if e is None:
            assert centred[m] is None
            continue
        want = _unit(e.double().numpy() - means[m].double().numpy())
        np.testing.assert_allclose(centred[m].numpy(), want, atol=1e-5)

    state = model.state_dict()
    assert {k for k in state if k.startswith("embed_center.")} == {f"embed_center.{m}" for m in means}
    again = build_model(config_from_dict(cfg))
    again.load_state_dict(state)  # the center travels with the weights
    torch.testing.assert_close(again.embed(batch)["image"], centred["image"])

    old = {k: v for k, v in state.items() if not k.startswith("embed_center.")}  # written before centring
    again.load_state_dict(old)
    torch.testing.assert_close(again.embed(batch)["image"], plain["image"])
    broken = dict(old)
    broken.pop(next(k for k in old if k.endswith("weight")))
    with pytest.raises(RuntimeError, match="Missing key"):  # other keys are still required
        again.load_state_dict(broken)


def test_update_center_is_the_mean_over_rows_that_have_the_modality(make_batch) -> None:
    torch.manual_seed(0)
    model = build_model(config_from_dict(SMALL))
    sample = {k: v.numpy() for k, v in make_batch(10, 32, 32).items()}
    sample["has_image"][[1, 7]] = False
    sample["has_profile"][3] = False
    model.embed_center.set({"image": torch.ones(16), "profile": torch.ones(16)})  # replaced, not stacked
    norms = update_center(model, sample, torch.device("cpu"))

    fresh = build_model(config_from_dict(SMALL))
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("embed_center.")})
    plain = fresh.embed({k: torch.as_tensor(v) for k, v in sample.items()})
    for m in ("image", "profile"):
        rows = plain[m].double().numpy()[sample[f"has_{m}"]]
        want = rows.mean(axis=0)
        np.testing.assert_allclose(getattr(model.embed_center, m).numpy(), want, atol=1e-6)
        assert norms[f"center_norm_{m}"] == pytest.approx(np.linalg.norm(want), abs=1e-6)
        assert 0 < norms[f"center_norm_{m}"] <= 1
