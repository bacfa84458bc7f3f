"""Checkpoint files: one ``checkpoint.pt`` (tensors and plain types only, so it loads with
``torch.load(weights_only=True)`` and cannot run arbitrary pickle) plus a readable ``config.yaml``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from xmodal import __version__
from xmodal.config import Config, config_from_dict

CKPT_FILE = "checkpoint.pt"


def save_checkpoint(
    directory: str | Path,
    cfg: Config,
    model: torch.nn.Module,
    epoch: int,
    global_step: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    metrics: dict[str, float] | None = None,
) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {
        "format": "xmodal-checkpoint-1",
        "xmodal_version": __version__,
        "config": cfg.to_dict(),
        "model": model.state_dict(),
        "epoch": epoch,  # completed epochs: training resumes at this epoch index
        "global_step": global_step,
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    torch.save(state, d / CKPT_FILE)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (d / "metrics.json").write_text(json.dumps(state["metrics"], indent=1))
    return d


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    p = Path(path)
    f = p / CKPT_FILE if p.is_dir() else p
    if not f.exists():
        raise FileNotFoundError(
            f"no {CKPT_FILE} at {p}; pass a checkpoint folder, its {CKPT_FILE}, or a run folder"
        )
    state = torch.load(f, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != "xmodal-checkpoint-1":
        raise ValueError(f"{f} is not an xmodal checkpoint (missing format tag)")
    state["config"] = config_from_dict(state["config"], where=str(f))
    return state


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, a ``checkpoint.pt``, or a run folder (-> its best, else newest, checkpoint)."""
    p = Path(path)
    if p.is_file() or (p / CKPT_FILE).exists():
        return p
    summary = p / "summary.json"
    if summary.exists():
        best = json.loads(summary.read_text()).get("best_checkpoint")
        if best and Path(best).exists():
            return Path(best)
    found = sorted(p.glob(f"checkpoint_*/{CKPT_FILE}"), key=lambda f: f.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"no checkpoint under {p}: run `xmodal pretrain` first or pass a checkpoint folder"
        )
    return found[-1].parent
