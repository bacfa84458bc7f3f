"""Two gloo processes on CPU give the same loss and the same gradients for every parameter as one
process on the concatenated batch: the cross-rank gradient bug class of contrastive losses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from xmodal.config import LossConfig
from xmodal.data.schema import N_CHANNELS
from xmodal.models.crossmodal import CrossModalModel
from xmodal.models.losses import clip, siglip
from xmodal.models.profile import ProfileTransformer

CASES = [("clip", 1), ("siglip", 1), ("clip", 2), ("siglip", 2)]
N, SPLIT, SIZE, LENGTH = 8, 5, 8, 12  # rank 0 holds rows [0, 5), rank 1 rows [5, 8): uneven on purpose


def _tiny_model(loss_name: str, buckets: int) -> CrossModalModel:
    # No BatchNorm: per-rank batch statistics would (rightly) differ from one process's.
    torch.manual_seed(0)
    image = nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    profile = ProfileTransformer(N_CHANNELS, LENGTH, width=8, depth=1, heads=2)
    loss = {"clip": clip, "siglip": siglip}[loss_name](LossConfig(name=loss_name, buckets=buckets))
    return CrossModalModel(image, 4, profile, embed_dim=6, metadata=True, loss=loss)


def _global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([12, 7, 12, 3, 9, 12, 5, 10])
    batch = {
        "image": torch.rand(N, 1, SIZE, SIZE, generator=g) * 2 - 1,
        "image_meta": torch.rand(N, 2, generator=g),
        "profile": torch.rand(N, N_CHANNELS, LENGTH, generator=g) * 2 - 1,
        "profile_mask": torch.arange(LENGTH)[None, :] < lengths[:, None],
        "profile_meta": torch.rand(N, 1, generator=g),
        "has_image": torch.ones(N, dtype=torch.bool),
        "has_profile": torch.ones(N, dtype=torch.bool),
    }
    batch["has_image"][2] = False  # on rank 0
    batch["has_profile"][6] = False  # on rank 1
    return batch


def _worker(rank: int, world: int, out_dir: str) -> None:
    rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, N)
    local = {k: v[rows] for k, v in _global_batch().items()}
    results = {}
    for name, buckets in CASES:
        model = _tiny_model(name, buckets)
        ddp = DistributedDataParallel(model)  # must outlive backward(): its reducer syncs the grads
        loss, stats = ddp(local)
        loss.backward()  # DDP averages the gradients over the two ranks here
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[f"{name}/{buckets}"] = {"loss": loss.detach(), "stats": stats, "grads": grads}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory, spawn_gloo) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    spawn_gloo(_worker, 2, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize(("name", "buckets"), CASES)
def test_two_ranks_match_one_process_on_the_concatenated_batch(ranks, name: str, buckets: int) -> None:
    model = _tiny_model(name, buckets)
    loss, stats = model(_global_batch())
    loss.backward()
    key = f"{name}/{buckets}"
    rank_losses = [r[key]["loss"] for r in ranks]
    # Each rank returns world_size x its share of the global mean: their mean is the global loss.
    torch.testing.assert_close(torch.stack(rank_losses).mean(), loss.detach(), atol=1e-5, rtol=0)
    for r in ranks:
        assert r[key]["stats"]["loss"] == pytest.approx(loss.item(), abs=1e-5)
        for stat in ("i2p_top1", "p2i_top1"):
            assert r[key]["stats"][stat] == pytest.approx(stats[stat], abs=1e-6)
        for pname, p in model.named_parameters():
            # float32 sums in another order: equal to ~1e-6 relative (some gradients reach ~10-100
            # at CLIP's initial logit scale of 1/0.07); a missing cross-rank term is off by O(1)
            torch.testing.assert_close(r[key]["grads"][pname], p.grad, atol=1e-5, rtol=1e-5, msg=pname)
