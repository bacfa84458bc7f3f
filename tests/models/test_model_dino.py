"""The DINO baseline: loss and centre against their formulas, the teacher EMA, views, training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from xmodal.config import config_from_dict
from xmodal.models.build import build_model
from xmodal.models.dino import DinoLoss, DinoModel, DinoSettings
from xmodal.models.multicrop import random_resized_views

TINY_HEAD = {"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8, "n_local": 2, "local_size": 8}


def _tiny_dino(**overrides: object) -> DinoModel:
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(1, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    settings = DinoSettings.from_kwargs({**TINY_HEAD, **overrides})
    return DinoModel(backbone, 8, 16, DinoLoss(settings))


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_loss_and_centre_equal_the_dino_formulas() -> None:
    g = torch.Generator().manual_seed(0)
    v, b, k = 4, 3, 5
    student, teacher = torch.randn(v, b, k, generator=g), torch.randn(2, b, k, generator=g)
    weight = torch.tensor([1.0, 0.0, 1.0])  # row 1 has no image
    s = DinoSettings(out_dim=k, student_temp=0.2, teacher_temp=0.05, center_momentum=0.8)
    loss_fn = DinoLoss(s)
    center = torch.randn(k, generator=g)
    loss_fn.center.copy_(center)
    loss = loss_fn(student, teacher, weight, teacher_temp=0.05)

    pairs = []
    for t in range(2):
        for view in range(v):
            if view == t:
                continue
            rows = []
            for row in (0, 2):
                q = _softmax([(float(teacher[t, row, j]) - float(center[j])) / 0.05 for j in range(k)])
                p = _softmax([float(student[view, row, j]) / 0.2 for j in range(k)])
                rows.append(-sum(q[j] * math.log(p[j]) for j in range(k)))
            pairs.append(sum(rows) / 2)
    assert loss.item() == pytest.approx(sum(pairs) / len(pairs), rel=1e-5)
    batch_mean = (teacher[:, 0] + teacher[:, 2]).sum(dim=0) / 4
    torch.testing.assert_close(loss_fn.center, 0.8 * center + 0.2 * batch_mean)


def test_teacher_follows_the_ema_formula_with_cosine_momentum() -> None:
    model = _tiny_dino(momentum=0.99)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    before_t = [p.clone() for p in model.teacher.parameters()]
    student = [p.clone() for p in model.student.parameters()]
    progress = 0.3
    m = 1 - (1 - 0.99) * (math.cos(math.pi * progress) + 1) / 2
    model.after_step(progress)
    for t_old, s, t_new in zip(before_t, student, model.teacher.parameters()):
        torch.testing.assert_close(t_new, m * t_old + (1 - m) * s, atol=1e-7, rtol=0)
    assert model.momentum_at(0.0) == pytest.approx(0.99)
    assert model.momentum_at(1.0) == pytest.approx(1.0)
    assert all(not p.requires_grad for p in model.teacher.parameters())


def test_student_steps_reduce_the_loss_against_a_fixed_teacher(make_batch) -> None:
    # Teacher and centre frozen, the objective is a fixed function of the student: a few
    # optimizer steps on the same views must lower it.
    model = _tiny_dino(momentum=1.0, center_momentum=1.0)
    batch = make_batch(8, image_size=16)
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=3e-3)
    losses = []
    for step in range(8):
        torch.manual_seed(123)  # the same views every step
        loss, stats = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_step(step / 8)
        losses.append(stats["loss"])
    assert losses[-1] < 0.9 * losses[0], losses


def test_full_crops_are_the_image_or_its_mirror() -> None:
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    views = random_resized_views(images, 4, 8, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert views.shape == (12, 1, 8, 8)
    for i, view in enumerate(views):
        src = images[i % 3]
        assert torch.allclose(view, src, atol=1e-5) or torch.allclose(view, src.flip(-1), atol=1e-5)


def test_crops_cover_the_requested_area_inside_the_image() -> None:
    size = 32
    ramp = (torch.arange(size) * 2 + 1) / size - 1  # pixel-centre x coordinate in [-1, 1]
    images = ramp.expand(5, 1, size, size).clone()
    views = random_resized_views(images, 2, size, scale=(0.25, 0.25), ratio=(1.0, 1.0))
    span = views.amax(dim=(1, 2, 3)) - views.amin(dim=(1, 2, 3))
    # Side 0.5 of the image: the sampled x range is half of the image's, minus one output pixel.
    torch.testing.assert_close(span, torch.full((10,), 0.5 * 2 * (size - 1) / size), atol=1e-4, rtol=0)
    assert views.min() >= ramp[0] - 1e-6 and views.max() <= ramp[-1] + 1e-6


def test_build_model_gives_the_image_only_baseline(make_batch) -> None:
    cfg = config_from_dict({"loss": {"name": "dino", "kwargs": {**TINY_HEAD, "local_size": 0, "n_local": 1}}})
    model = build_model(cfg)
    assert model.modalities == ("image",)
    assert isinstance(model, DinoModel) and model.local_size == 32
    batch = make_batch(2)
    loss, stats = model(batch)
    assert torch.isfinite(loss) and isinstance(stats["loss"], float)
    emb = model.embed(batch)
    assert emb["profile"] is None
    torch.testing.assert_close(emb["image"].norm(dim=1), torch.ones(2))
    trainable = {id(p) for g in model.param_groups(1e-3) for p in g["params"]}
    assert trainable == {id(p) for p in model.student.parameters()}


def test_unknown_dino_setting_is_named() -> None:
    with pytest.raises(ValueError, match="n_locals"):
        DinoSettings.from_kwargs({"n_locals": 4})
