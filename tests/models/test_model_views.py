"""Flip averaging (xmodal/models/views.py): the mirror against a per-row loop, the average against
the same weights with it off, before centring, invariant to mirroring, and old checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xmodal.config import config_from_dict
from xmodal.models.build import build_model
from xmodal.models.views import reverse_valid

SMALL = {"data": {"image_size": 32, "profile_length": 32}, "model": {"embed_dim": 16}}
DINO = {**SMALL, "loss": {"name": "dino", "kwargs": {"out_dim": 32, "hidden_dim": 16, "n_local": 0}}}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _numpy_mirror(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Image flipped left-right, each profile's first n samples reversed (n = its mask's count)."""
    out = dict(batch)
    out["image"] = torch.from_numpy(batch["image"].numpy()[..., ::-1].copy())
    prof = batch["profile"].numpy().copy()
    for i, n in enumerate(batch["profile_mask"].sum(dim=1).tolist()):
        prof[i, :, :n] = prof[i, :, :n][:, ::-1]
    out["profile"] = torch.from_numpy(prof)
    return out


def _partial_masks(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    length = batch["profile_mask"].shape[1]
    lengths = torch.tensor([length, 1, 5, length - 1, 17, 2])[: len(batch["profile_mask"])]
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return {**batch, "profile_mask": mask, "profile": batch["profile"] * mask[:, None, :]}


def test_reverse_valid_reverses_each_prefix_and_keeps_the_padding(make_batch) -> None:
    batch = _partial_masks(make_batch(6, 8, 32))
    got = reverse_valid(batch["profile"], batch["profile_mask"])
    torch.testing.assert_close(got, _numpy_mirror(batch)["profile"], rtol=0, atol=0)
    full = make_batch(3, 8, 32)
    torch.testing.assert_close(reverse_valid(full["profile"], full["profile_mask"]), full["profile"].flip(-1))


@pytest.mark.parametrize("cfg", [SMALL, DINO], ids=["crossmodal", "dino"])
def test_embedding_is_the_normalised_mean_of_both_views_then_centred(cfg, make_batch) -> None:
    torch.manual_seed(0)
    model = build_model(config_from_dict(cfg))
    assert model.embed_flip.on  # the default
    plain = build_model(config_from_dict({**cfg, "model": {**cfg["model"], "embed_flip": False}}))
    assert not plain.embed_flip.on
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "embed_flip.enabled"})
    batch = _partial_masks(make_batch(6, 32, 32))

    one, other = plain.embed(batch), plain.embed(_numpy_mirror(batch))
    got = model.embed(batch)
    for m, e in got.items():
        if e is None:
            assert m == "profile" and cfg is DINO
            continue
        want = _unit(one[m].double().numpy() + other[m].double().numpy())
        np.testing.assert_allclose(e.numpy(), want, atol=1e-5)
    # the particle and its mirror image get the same embedding
    mirrored = model.embed(_numpy_mirror(batch))
    torch.testing.assert_close(mirrored["image"], got["image"], atol=1e-5, rtol=0)
    # centring comes after the average
    c = torch.full((got["image"].shape[1],), 0.1)
    model.embed_center.set({"image": c})
    want = _unit(got["image"].double().numpy() - c.double().numpy())
    np.testing.assert_allclose(model.embed(batch)["image"].numpy(), want, atol=1e-5)


def test_the_switch_travels_with_the_weights_and_old_checkpoints_load_without_it(make_batch) -> None:
    torch.manual_seed(0)
    on = build_model(config_from_dict(SMALL))
    batch = make_batch(4, 32, 32)
    state = on.state_dict()
    off_cfg = config_from_dict({**SMALL, "model": {**SMALL["model"], "embed_flip": False}})
    again = build_model(off_cfg)
    again.load_state_dict(state)  # the checkpoint's choice wins over the config it is built from
    assert again.embed_flip.on
    torch.testing.assert_close(again.embed(batch)["profile"], on.embed(batch)["profile"])

    old = {k: v for k, v in state.items() if k != "embed_flip.enabled"}  # written before flip averaging
    fresh = build_model(config_from_dict(SMALL))
    fresh.load_state_dict(old)
    assert not fresh.embed_flip.on
    with torch.no_grad():  # one view, no centring: what such a checkpoint always gave
        single = on.eval().encode_profile(batch)
    torch.testing.assert_close(fresh.embed(batch)["profile"], single)


def test_training_loss_does_not_use_it(make_batch) -> None:
    torch.manual_seed(0)
    on = build_model(config_from_dict(SMALL))
    off = build_model(config_from_dict({**SMALL, "model": {**SMALL["model"], "embed_flip": False}}))
    off.load_state_dict({k: v for k, v in on.state_dict().items() if k != "embed_flip.enabled"})
    batch = make_batch(8, 32, 32)
    torch.testing.assert_close(on(batch)[0], off(batch)[0])
