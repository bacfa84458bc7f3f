"""Checkpoint files: one ``checkpoint.pt`` (tensors and plain types only, so it loads with
``torch.load(weights_only=True)`` and cannot run arbitrary pickle) plus a readable ``config.yaml``."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
import yaml

from xmodal import __version__
from xmodal.config import Config, config_from_dict
from xmodal.data.quarantine import DataError

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
    try:
        state = torch.load(f, map_location=map_location, weights_only=True)
    except PermissionError:
        raise
    except Exception as e:  # a text file fails with KeyError, an empty one with EOFError, ...
        raise DataError(
            f"{f} is not a readable xmodal checkpoint: {_why_unreadable(e)}; pass a checkpoint folder "
            f"written by `xmodal pretrain`, its {CKPT_FILE}, or a run folder"
        ) from e
    if not isinstance(state, dict) or state.get("format") != "xmodal-checkpoint-1":
        raise DataError(
            f"{f} is not an xmodal checkpoint (a torch file without xmodal's format tag); pass a checkpoint "
            f"folder written by `xmodal pretrain`, its {CKPT_FILE}, or a run folder"
        )
    state["config"] = config_from_dict(state["config"], where=str(f))
    return state


def _why_unreadable(e: Exception) -> str:
    # torch's messages name no file (a truncated zip: "[Errno 22] Invalid argument"), and its
    # weights-only refusals advise weights_only=False, which would run whatever code the file holds:
    # never repeat those
    if isinstance(e, pickle.UnpicklingError):
        if "Unsupported global" in str(e):
            return (
                "it holds pickled objects other than tensors and plain values, refused because "
                "loading them could run code"
            )
        return "another kind of file, or a corrupt one"
    detail = str(e).splitlines()[0][:120] if str(e) else ""
    return (
        f"truncated or corrupt, or another kind of file ({type(e).__name__}{': ' if detail else ''}{detail})"
    )


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
