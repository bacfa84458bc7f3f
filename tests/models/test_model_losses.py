"""clip and siglip against their formulas written out element by element (float64 loops)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xmodal.config import LossConfig
from xmodal.models.losses import ClipLoss, SigLipLoss, clip, siglip


def _embeddings(n: int, e: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, e, generator=g, dtype=torch.float64), dim=1)
    prof = F.normalize(torch.randn(n, e, generator=g, dtype=torch.float64), dim=1)
    return img, prof


def _clip_reference(img: torch.Tensor, prof: torch.Tensor, s: float) -> tuple[float, float]:
    """Symmetric InfoNCE and its derivative with respect to log(s), from the textbook formulas:
    d/ds of -log softmax_i = -x_ii + sum_j softmax_j x_ij."""
    n = img.shape[0]
    x = [[float(img[i] @ prof[j]) for j in range(n)] for i in range(n)]
    loss = dlogs = 0.0
    for direction in (x, [list(col) for col in zip(*x)]):
        for i in range(n):
            z = [math.exp(s * direction[i][j]) for j in range(n)]
            total = sum(z)
            loss += -math.log(z[i] / total) / (2 * n)
            expected_x = sum(z[j] / total * direction[i][j] for j in range(n))
            dlogs += s * (-direction[i][i] + expected_x) / (2 * n)
    return loss, dlogs


def _siglip_reference(
    img: torch.Tensor, prof: torch.Tensor, s: float, b: float
) -> tuple[float, float, float]:
    """-(1/n) sum_ij log sigmoid(z_ij (s x_ij + b)); d/db and d/dlog(s) from
    d/du[-log sigmoid(u)] = -(1 - sigmoid(u))."""
    n = img.shape[0]
    loss = dlogs = db = 0.0
    for i in range(n):
        for j in range(n):
            x = float(img[i] @ prof[j])
            z = 1.0 if i == j else -1.0
            u = z * (s * x + b)
            sig = 1 / (1 + math.exp(-u))
            loss += -math.log(sig) / n
            db += -(1 - sig) * z / n
            dlogs += -(1 - sig) * z * x * s / n
    return loss, dlogs, db


def test_clip_equals_formula_with_scale_gradient() -> None:
    img, prof = _embeddings(6)
    s = 3.7
    loss_fn = ClipLoss(s, True, 100.0, 1).double()
    loss, stats = loss_fn(img, prof, torch.ones(6, dtype=torch.bool))
    loss.backward()
    ref_loss, ref_dlogs = _clip_reference(img, prof, loss_fn.logit_scale.exp().item())
    assert loss.item() == pytest.approx(ref_loss, abs=1e-10)
    assert stats["loss"] == pytest.approx(ref_loss, abs=1e-10)
    assert loss_fn.logit_scale.grad.item() == pytest.approx(ref_dlogs, abs=1e-10)


def test_siglip_equals_formula_with_scale_and_bias_gradients() -> None:
    img, prof = _embeddings(5, seed=1)
    s, b = math.e, -2.5
    loss_fn = SigLipLoss(s, True, 100.0, 1, b).double()
    loss, stats = loss_fn(img, prof, torch.ones(5, dtype=torch.bool))
    loss.backward()
    ref_loss, ref_dlogs, ref_db = _siglip_reference(img, prof, loss_fn.logit_scale.exp().item(), b)
    assert loss.item() == pytest.approx(ref_loss, abs=1e-10)
    assert stats["logit_bias"] == pytest.approx(b)
    assert loss_fn.logit_scale.grad.item() == pytest.approx(ref_dlogs, abs=1e-10)
    assert loss_fn.logit_bias.grad.item() == pytest.approx(ref_db, abs=1e-10)


@pytest.mark.parametrize("make", [clip, siglip])
def test_rows_without_both_modalities_are_neither_anchors_nor_negatives(make) -> None:
    img, prof = _embeddings(7, seed=2)
    loss_fn = make(LossConfig(name=make.__name__)).double()
    valid = torch.tensor([True, False, True, True, False, True, True])
    masked, stats = loss_fn(img, prof, valid)
    subset, _ = loss_fn(img[valid], prof[valid], torch.ones(5, dtype=torch.bool))
    torch.testing.assert_close(masked, subset)
    # Garbage in the rows that do not count must not matter either, NaN-free.
    img2, prof2 = img.clone(), prof.clone()
    img2[~valid] = 0.0
    masked2, _ = loss_fn(img2, prof2, valid)
    masked2.backward()
    torch.testing.assert_close(masked2, subset)
    assert all(torch.isfinite(p.grad).all() for p in loss_fn.parameters())


@pytest.mark.parametrize("make", [clip, siglip])
def test_buckets_restrict_negatives_to_sub_batches(make) -> None:
    img, prof = _embeddings(8, seed=3)
    whole = make(LossConfig(name=make.__name__)).double()
    bucketed = make(LossConfig(name=make.__name__, buckets=2)).double()
    ones = torch.ones(4, dtype=torch.bool)
    first, _ = whole(img[:4], prof[:4], ones)
    second, _ = whole(img[4:], prof[4:], ones)
    loss, _ = bucketed(img, prof, torch.ones(8, dtype=torch.bool))
    torch.testing.assert_close(loss, (first + second) / 2)


def test_in_batch_top1_counts_rows_that_retrieve_their_partner() -> None:
    img, _ = _embeddings(4, seed=4)
    prof = img.clone()
    prof[[0, 1]] = img[[1, 0]]  # rows 0 and 1 swapped: only rows 2, 3 retrieve their partner
    _, stats = ClipLoss(10.0, True, 100.0, 1).double()(img, prof, torch.ones(4, dtype=torch.bool))
    assert stats["i2p_top1"] == pytest.approx(0.5)
    assert stats["p2i_top1"] == pytest.approx(0.5)


def test_scale_clamped_after_step_and_fixed_scale_is_not_a_parameter() -> None:
    learnable = ClipLoss(math.e, True, 100.0, 1)
    with torch.no_grad():
        learnable.logit_scale.fill_(math.log(500.0))
    learnable.after_step()
    assert learnable.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-5)

    fixed = clip(LossConfig(learnable_scale=False, logit_scale=20.0))
    assert [n for n, _ in fixed.named_parameters()] == []
    assert "logit_scale" in dict(fixed.named_buffers())
    _, stats = fixed(*_embeddings(3), torch.ones(3, dtype=torch.bool))
    assert stats["logit_scale"] == pytest.approx(20.0, rel=1e-5)


def test_unused_loss_kwargs_are_an_error() -> None:
    with pytest.raises(ValueError, match="loss.kwargs"):
        clip(LossConfig(kwargs={"n_local": 4}))
