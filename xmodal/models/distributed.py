"""Cross-rank feature exchange for the contrastive losses.

``gather_with_grad`` returns the batch concatenated over all ranks *with* autograd: the backward
pass sums every rank's gradient for a rank's rows back onto that rank. That is what makes a local loss against the gathered batch
(open_clip's ``local_loss=True, gather_with_grad=True``) give exactly the single-process gradient
once DDP averages gradients over ranks, provided each rank scales its loss by the world size (see
``losses.ContrastiveLoss``). Ranks may hold different batch sizes (a short last batch): rows are
padded for the collective and cut out again, so the gathered batch is exactly the concatenation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

_local_only = False


@contextmanager
def local_only() -> Iterator[None]:
    """Compute losses on this rank's rows alone, with no collectives: for work that one rank does
    while the others wait (rank-0 validation), where a collective would deadlock."""
    global _local_only
    prev, _local_only = _local_only, True
    try:
        yield
    finally:
        _local_only = prev


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised or inside ``local_only``."""
    if not _local_only and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# torch 2.14 renamed all_gather_into_tensor (deprecated there, with a warning on every call, i.e.
# every training step); older torch (e.g. 2.11 on GPU images) only has the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _AllGatherSum(torch.autograd.Function):
    """all_gather forward; backward = the sum over ranks of the gradient for this rank's rows.

    An all_reduce of the whole gradient then a slice, rather than torch's deprecated
    ``torch.distributed.nn.functional.all_gather``: every backend (gloo, NCCL) supports it and the
    gathered features are small (batch x embedding).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        world_size = dist.get_world_size()
        ctx.rows = x.shape[0]  # type: ignore[attr-defined]
        ctx.rank = dist.get_rank()  # type: ignore[attr-defined]
        out = x.new_empty((world_size * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = ctx.rank * ctx.rows  # type: ignore[attr-defined]
        return grad[start : start + ctx.rows]  # type: ignore[attr-defined]


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
    parts = _AllGatherSum.apply(padded).split(longest)
    rows = torch.cat([p[:s] for p, s in zip(parts, sizes)])
    return Gathered(rows, sum(sizes[:rank]), world_size)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of a detached tensor over ranks (identity on one process)."""
    t = t.detach().clone()
    if world()[1] > 1:
        dist.all_reduce(t)
    return t


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (batch-norm running statistics, ...) to every rank (no-op on one
    process). DDP broadcasts them at the start of each forward, so after a rank's last training step
    its running statistics are its own; work shared by the ranks must use rank 0's, the ones saved."""
    if world()[1] > 1:
        for buf in module.buffers():
            dist.broadcast(buf, 0)
