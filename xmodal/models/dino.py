"""The image-only self-supervised baseline: DINO (Caron et al. 2021).

Own implementation rather than ``lightly``'s pieces: lightly is not among the pinned dependencies,
its multi-crop transforms work per PIL image (here the views are made in torch from the batch the
shared Ray Data pipeline already decoded, see ``multicrop.py``), and the parts DINO needs (a head,
a centred/sharpened cross-entropy, an EMA) are short enough to test against their formulas here.

Student and teacher share an architecture (image backbone + DINO head). The student sees
``2 + n_local`` views, the teacher the 2 global ones; the loss is the cross-entropy between the
teacher's centred, sharpened softmax and the student's softmax over every (teacher view, other
student view) pair. The centre is an EMA of the teacher's batch mean (all-reduced over ranks); the
teacher is an EMA of the student with momentum rising from ``momentum`` to 1 on a cosine schedule.
Settings come from ``loss.kwargs`` (fields of ``DinoSettings``). Embeddings for k-NN are the
teacher backbone's features, as in DINO's own k-NN evaluation.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xmodal.config import LossConfig
from xmodal.models.base import Batch, XModalModule, eval_mode, require
from xmodal.models.center import EmbeddingCenter
from xmodal.models.distributed import all_reduce_sum, world
from xmodal.models.image import feature_width
from xmodal.models.multicrop import random_resized_views
from xmodal.models.registries import LOSSES
from xmodal.models.views import FlipAverage


@dataclass
class DinoSettings:
    out_dim: int = 4096  # prototypes (DINO: 65536; smaller suits plankton-sized datasets)
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    n_local: int = 6
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    local_size: int = 0  # 0 = image_size * 96/224 (DINO's ratio), at least min(image_size, 32)
    brightness: float = 0.4
    contrast: float = 0.4
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    teacher_temp_warmup: float = 0.0  # fraction of training over which the teacher temp warms up
    center_momentum: float = 0.9
    momentum: float = 0.996  # teacher EMA momentum at the start; rises to 1 by the end

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, object]) -> DinoSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"loss.kwargs: unknown DINO setting(s) {unknown}; valid: {sorted(names)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        return cls(**values)  # type: ignore[arg-type]

    def local_size_for(self, image_size: int) -> int:
        # Stride-32 backbones (ConvNeXt, EfficientNet) need >= 32 px to keep a feature map.
        return self.local_size or max(round(image_size * 96 / 224), min(image_size, 32))


class DinoHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised prototypes (DINO's ``norm_last_layer``)."""

    def __init__(self, in_dim: int, s: DinoSettings):
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(s.head_layers - 1):
            layers += [nn.Linear(dim, s.hidden_dim), nn.GELU()]
            dim = s.hidden_dim
        layers.append(nn.Linear(dim, s.bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Parameter(torch.randn(s.out_dim, s.bottleneck_dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        return F.linear(z, F.normalize(self.prototypes, dim=1))


class DinoLoss(nn.Module):
    """Cross-entropy between centred, sharpened teacher outputs and student outputs."""

    def __init__(self, s: DinoSettings):
        super().__init__()
        self.settings = s
        self.register_buffer("center", torch.zeros(s.out_dim))

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        """``student`` (V, B, K) logits over all views, ``teacher`` (2, B, K) over the global views,
        ``weight`` (B,) = 1 for rows that count. Updates the centre (a side effect, as in DINO)."""
        log_p = F.log_softmax(student / self.settings.student_temp, dim=-1)
        q = F.softmax((teacher - self.center) / teacher_temp, dim=-1).detach()
        # ce[t, v] = weighted mean over rows of -sum_k q[t] log p[v]
        per_row = -torch.einsum("tbk,vbk->tvb", q, log_p)
        n_rows = weight.sum().clamp(min=1)
        ce = (per_row * weight).sum(dim=-1) / n_rows
        n_views = student.shape[0]
        off_diag = ~torch.eye(teacher.shape[0], n_views, dtype=torch.bool, device=ce.device)
        loss = ce[off_diag].mean()
        self.update_center(teacher, weight)
        return loss

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor, weight: torch.Tensor) -> None:
        sums = all_reduce_sum(
            torch.cat(
                [(teacher * weight[None, :, None]).sum(dim=(0, 1)), (weight.sum() * teacher.shape[0])[None]]
            )
        )
        batch_center = sums[:-1] / sums[-1].clamp(min=1)
        m = self.settings.center_momentum
        self.center.mul_(m).add_(batch_center, alpha=1 - m)


@LOSSES.register("dino")
def dino(cfg: LossConfig) -> DinoLoss:
    return DinoLoss(DinoSettings.from_kwargs(cfg.kwargs))


class DinoModel(XModalModule):
    modalities = ("image",)

    def __init__(
        self, backbone: nn.Module, feature_dim: int, image_size: int, loss: DinoLoss, embed_flip: bool = True
    ):
        super().__init__()
        s = loss.settings
        self.settings = s
        self.image_size = image_size
        self.local_size = s.local_size_for(image_size)
        if s.n_local:
            feature_width(backbone, f"{type(backbone).__name__} (DINO local views)", self.local_size)
        self.student = nn.ModuleDict({"backbone": backbone, "head": DinoHead(feature_dim, s)})
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.loss = loss
        # A buffer, so that a resumed run continues the temperature schedule where it stopped.
        self.register_buffer("progress", torch.zeros(()))
        self.embed_center = EmbeddingCenter({"image": feature_dim})
        self.embed_flip = FlipAverage(embed_flip)

    def momentum_at(self, progress: float) -> float:
        """Teacher EMA momentum: cosine from ``momentum`` at progress 0 to 1 at progress 1."""
        base = self.settings.momentum
        return 1 - (1 - base) * (math.cos(math.pi * min(max(progress, 0.0), 1.0)) + 1) / 2

    def teacher_temp_at(self, progress: float) -> float:
        s = self.settings
        if s.teacher_temp_warmup <= 0 or progress >= s.teacher_temp_warmup:
            return s.teacher_temp
        t = progress / s.teacher_temp_warmup
        return s.warmup_teacher_temp + t * (s.teacher_temp - s.warmup_teacher_temp)

    def _run(self, net: nn.ModuleDict, x: torch.Tensor, n_views: int) -> torch.Tensor:
        return net["head"](net["backbone"](x)).unflatten(0, (n_views, -1))

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        s = self.settings
        images = require(batch, "image")
        weight = require(batch, "has_image").to(images.dtype)
        with torch.no_grad():
            glob = random_resized_views(images, 2, self.image_size, s.global_scale, s.brightness, s.contrast)
        student = [self._run(self.student, glob, 2)]
        if s.n_local:
            with torch.no_grad():
                local = random_resized_views(
                    images, s.n_local, self.local_size, s.local_scale, s.brightness, s.contrast
                )
            student.append(self._run(self.student, local, s.n_local))
        with torch.no_grad():
            teacher = self._run(self.teacher, glob, 2)
        temp = self.teacher_temp_at(float(self.progress))
        loss = self.loss(torch.cat(student).float(), teacher.float(), weight.float(), temp)
        mean_loss = all_reduce_sum(loss) / world()[1]
        stats = {
            "loss": float(mean_loss),
            "teacher_temp": temp,
            "momentum": self.momentum_at(float(self.progress)),
        }
        return loss, stats

    def embed(self, batch: Batch) -> dict[str, torch.Tensor | None]:
        with eval_mode(self):
            image = self.embed_flip(self._teacher_embedding, batch, "image")
            return {"image": self.embed_center("image", image), "profile": None}

    def _teacher_embedding(self, batch: Batch) -> torch.Tensor:
        return F.normalize(self.teacher["backbone"](require(batch, "image")), dim=-1)

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """Teacher <- m * teacher + (1 - m) * student, with m from the momentum schedule."""
        self.progress.fill_(progress)
        m = self.momentum_at(progress)
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            t.mul_(m).add_(s.detach(), alpha=1 - m)
