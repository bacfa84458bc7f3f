"""DINO's multi-crop views, made in torch for the whole batch at once.

Each view is one ``affine_grid`` + ``grid_sample`` over the batch: a random resized crop (area
fraction and aspect ratio per sample), a random horizontal flip, then brightness/contrast jitter.
Working on the already-decoded ``image`` tensor keeps the Ray Data pipeline shared with the
cross-modal model, and on a GPU the views cost one kernel per view rather than per image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_resized_views(
    images: torch.Tensor,
    n_views: int,
    size: int,
    scale: tuple[float, float],
    brightness: float = 0.0,
    contrast: float = 0.0,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``n_views`` crops of every image: (B, C, S, S) in [-1, 1] -> (n_views * B, C, size, size),
    view-major (rows ``v*B : (v+1)*B`` are view ``v``). ``scale`` bounds the crop's area as a
    fraction of the image; crops never leave the image."""
    b, c = images.shape[:2]
    n = n_views * b
    dev, dt = images.device, images.dtype

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, device=dev, dtype=dt, generator=generator) * (hi - lo) + lo

    area = uniform(*scale)
    log_ratio = uniform(math.log(ratio[0]), math.log(ratio[1]))
    # Width/height as fractions of the side; clamping keeps the crop inside the image.
    w = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)
    h = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
    cx = uniform(-1.0, 1.0) * (1 - w)
    cy = uniform(-1.0, 1.0) * (1 - h)
    flip = torch.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0).to(dt)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=dt)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    source = images.repeat(n_views, 1, 1, 1)
    views = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if brightness or contrast:
        mean = views.mean(dim=(1, 2, 3), keepdim=True)
        gain = uniform(1 - contrast, 1 + contrast).view(n, 1, 1, 1)
        shift = uniform(-brightness, brightness).view(n, 1, 1, 1)
        views = ((views - mean) * gain + mean + shift).clamp(-1.0, 1.0)
    return views
