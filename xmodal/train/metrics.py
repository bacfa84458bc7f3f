"""Run observability: ``metrics.jsonl`` (one JSON object per step/epoch record), TensorBoard
event files, and the human progress line with rate and ETA."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends to ``<run_dir>/metrics.jsonl`` and ``<run_dir>/tb/`` (appending keeps a resumed run's history)."""

    def __init__(self, run_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self._tb = SummaryWriter(str(self.run_dir / "tb"))

    def log(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        rec = {"kind": kind, "step": step, "time": time.time(), **metrics}
        self._jsonl.write(json.dumps(rec) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        self._jsonl.close()
        self._tb.close()


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(epoch: int, epochs: int, metrics: dict[str, Any], elapsed: float, done_epochs: int) -> str:
    eta = elapsed / max(1, done_epochs) * (epochs - epoch - 1)
    parts = [f"epoch {epoch + 1}/{epochs}", f"loss {metrics.get('train_loss', float('nan')):.4f}"]
    if "val_loss" in metrics:
        parts.append(f"val_loss {metrics['val_loss']:.4f}")
    if "val_combo" in metrics:
        parts.append(f"val {metrics.get('val_combo', '')} {100 * metrics['val_score']:.1f}%")
    parts += [
        f"scale {metrics.get('logit_scale', float('nan')):.2f}",
        f"{metrics.get('samples_per_s', 0):.0f} samples/s",
        f"data-wait {100 * metrics.get('data_wait_frac', 0):.0f}%",
        f"ETA {format_duration(eta)}",
    ]
    return " | ".join(parts)
