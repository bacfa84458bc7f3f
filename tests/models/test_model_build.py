from __future__ import annotations

import math

import pytest
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
    assert math.isclose(stats["logit_scale"], cfg.loss.logit_scale, rel_tol=1e-6)
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


@pytest.mark.parametrize(
    ("loss", "encoder", "kwargs"),
    [
        ("siglip", "lstm", {"hidden": 8, "layers": 1}),
        ("clip", "transformer", {"width": 16, "depth": 1, "heads": 2}),
    ],
)
def test_losses_and_profile_encoders_are_chosen_by_name(make_batch, loss, encoder, kwargs) -> None:
    cfg = config_from_dict(
        {
            "loss": {"name": loss},
            "model": {"profile_encoder": encoder, "profile_kwargs": kwargs, "metadata": False},
        }
    )
    model = build_model(cfg)
    assert type(model.profile_encoder).__name__.lower().endswith(encoder)
    batch = make_batch(4)
    del batch["image_meta"], batch["profile_meta"]  # metadata off: not needed
    loss_value, stats = model(batch)
    assert torch.isfinite(loss_value)
    if loss == "siglip":
        assert stats["logit_bias"] == pytest.approx(-10.0)


def test_param_groups_exempt_scale_bias_norms_and_tokens_from_decay() -> None:
    cfg = config_from_dict(
        {
            "loss": {"name": "siglip"},
            "model": {"profile_encoder": "transformer", "profile_kwargs": {"depth": 1}},
        }
    )
    model = build_model(cfg)
    groups = model.param_groups(0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    exempt = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed | exempt == set(names.values()) and not decayed & exempt
    assert {"loss.logit_scale", "loss.logit_bias", "profile_encoder.cls", "profile_encoder.pos"} <= exempt
    assert "image_head.proj.bias" in exempt and "profile_encoder.norm.weight" in exempt
    assert "image_head.proj.weight" in decayed and "image_encoder.conv1.0.weight" in decayed
    assert all(model.get_parameter(n).ndim > 1 for n in decayed)


def test_bad_profile_kwargs_name_the_setting() -> None:
    cfg = config_from_dict({"model": {"profile_kwargs": {"widht": 3}}})
    with pytest.raises(TypeError, match="model.profile_kwargs for 'cnn'"):
        build_model(cfg)


def test_the_loss_names_the_modalities_it_trains_on() -> None:
    from xmodal.models.build import trained_modalities

    assert trained_modalities(config_from_dict({"loss": {"name": "siglip"}})) == ("image", "profile")
    assert trained_modalities(config_from_dict({"loss": {"name": "dino"}})) == ("image",)


def test_a_checkpoint_trained_from_a_pretrained_file_loads_after_the_file_is_gone(tmp_path) -> None:
    """``model.pretrained_path`` gives initial weights only: a checkpoint's weights replace them, so
    embedding (and resuming) must not need the file."""
    import timm

    from xmodal.eval.embed import model_from_state

    weights = tmp_path / "init.pth"
    torch.save(timm.create_model("resnet10t", in_chans=1, num_classes=0).state_dict(), weights)
    cfg = config_from_dict({"model": {"pretrained_path": str(weights), "center_particles": 0}})
    state = {"config": cfg, "model": build_model(cfg).state_dict()}
    weights.unlink()
    with pytest.raises(Exception, match="pretrained_path"):
        build_model(cfg)  # as before: a model that trains from the file needs it
    module = model_from_state(state, torch.device("cpu"))
    for name, value in module.state_dict().items():
        torch.testing.assert_close(value, state["model"][name], msg=name)
