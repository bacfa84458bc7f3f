"""The CUDA paths (bf16 autocast, channels_last, torch.compile, bf16 embedding) against the fp32 CPU
computation of the same weights. Skipped without a CUDA device; run on a GPU node by bench/gpu_check.sh."""

from __future__ import annotations

import copy

import pytest
import torch

from xmodal.config import config_from_dict
from xmodal.eval.embed import embed_arrays
from xmodal.models.build import build_model
from xmodal.train.loop import _autocast

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def _pair(image_encoder: str, image_size: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = config_from_dict(
        {
            "data": {"image_size": image_size, "profile_length": 64},
            "model": {"image_encoder": image_encoder, "profile_encoder": "cnn", "embed_dim": 128},
        }
    )
    cpu = build_model(cfg).train()
    gpu = copy.deepcopy(cpu).to(CUDA).to(memory_format=torch.channels_last)
    return cfg, cpu, gpu


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    out = {k: v.to(device) for k, v in batch.items()}
    out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out


def _cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float().cpu(), b.float().cpu(), dim=1)


@pytest.mark.parametrize("image_encoder", ["resnet10t", "efficientnet_b0"])
def test_bf16_channels_last_step_matches_fp32_cpu(make_batch, image_encoder) -> None:
    cfg, cpu, gpu = _pair(image_encoder, 64)
    batch = make_batch(32, 64, 64)
    # BatchNorm in train mode uses batch statistics on both sides, so the two losses see the same model
    loss_cpu, _ = cpu(batch)
    with _autocast(CUDA, "bf16"):
        loss_gpu, stats = gpu(_to(batch, CUDA))
    assert torch.isfinite(loss_gpu)
    assert abs(loss_gpu.item() - loss_cpu.item()) <= 0.03 * abs(loss_cpu.item()) + 0.02
    loss_gpu.backward()
    loss_cpu.backward()
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        if p_cpu.grad is None:
            continue
        assert torch.isfinite(p_gpu.grad).all(), name
    # the gradient of the whole model points the same way: bf16 rounding through ~40 layers leaves a
    # cosine of ~0.93 at random initialisation (CPU bf16 autocast); a layout or cast bug gives ~0
    g_cpu = torch.cat([p.grad.flatten() for p in cpu.parameters() if p.grad is not None])
    g_gpu = torch.cat([p.grad.flatten().cpu() for p in gpu.parameters() if p.grad is not None])
    assert torch.nn.functional.cosine_similarity(g_cpu, g_gpu.float(), dim=0) > 0.8


def test_bf16_embeddings_match_fp32(make_batch) -> None:
    _, cpu, _ = _pair("efficientnet_b0", 64)
    cpu.eval()
    batch = {k: v.numpy() for k, v in make_batch(600, 64, 64, seed=3).items()}
    ref = embed_arrays(cpu, batch, torch.device("cpu"))
    got = embed_arrays(copy.deepcopy(cpu).to(CUDA), batch, CUDA)  # chunks of 256: a partial last chunk too
    for m in ("image", "profile"):
        assert got[m].dtype == ref[m].dtype and got[m].shape == ref[m].shape
        assert _cosine_rows(torch.from_numpy(got[m]), torch.from_numpy(ref[m])).min() > 0.99


def test_compiled_model_matches_eager(make_batch) -> None:
    _, _, gpu = _pair("resnet10t", 32)
    batch = _to(make_batch(64, 32, 64, seed=1), CUDA)
    compiled = torch.compile(gpu)
    with _autocast(CUDA, "bf16"):
        loss_eager, _ = gpu(batch)
        loss_compiled, _ = compiled(batch)
    assert torch.isfinite(loss_compiled)
    assert abs(loss_compiled.item() - loss_eager.item()) <= 0.02 * abs(loss_eager.item()) + 0.02
    loss_compiled.backward()
    assert all(torch.isfinite(p.grad).all() for p in gpu.parameters() if p.grad is not None)
