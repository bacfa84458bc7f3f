"""Cross-rank feature exchange for the contrastive losses.

``gather_with_grad`` returns the batch concatenated over all ranks *with* autograd: the backward
pass sums every rank's gradient for a rank's rows back onto that rank (torch's all_gather autograd
function reduce-scatters / all-to-alls). That is what makes a local loss against the gathered batch
(open_clip's ``local_loss=True, gather_with_grad=True``) give exactly the single-process gradient
once DDP averages gradients over ranks, provided each rank scales its loss by the world size (see
``losses.ContrastiveLoss``). Ranks may hold different batch sizes (a short last batch): rows are
padded for the collective and cut out again, so the gathered batch is exactly the concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class Gathered:
    rows: torch.Tensor  # all ranks' rows concatenated in rank order
    offset: int  # global index of this rank's first row
    world_size: int


def gather_with_grad(x: torch.Tensor) -> Gathered:
    """All ranks' rows of ``x`` (float, any shape after dim 0), differentiable.

    Callers pack everything they need into one tensor: one collective per step, not one per field.
    """
    rank, world_size = world()
    if world_size == 1:
        return Gathered(x, 0, 1)
    n = x.shape[0]
    sizes_list = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size)]
    dist.all_gather(sizes_list, torch.tensor([n], dtype=torch.long, device=x.device))
    sizes = [int(s.item()) for s in sizes_list]
    longest = max(sizes)
    padded = torch.cat([x, x.new_zeros((longest - n, *x.shape[1:]))]) if n < longest else x
    parts = dist_fn.all_gather(padded)
    rows = torch.cat([p[:s] for p, s in zip(parts, sizes)])
    return Gathered(rows, sum(sizes[:rank]), world_size)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of a detached tensor over ranks (identity on one process)."""
    t = t.detach().clone()
    if world()[1] > 1:
        dist.all_reduce(t)
    return t
