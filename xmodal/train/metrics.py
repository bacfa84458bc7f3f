"""Run observability: ``metrics.jsonl`` (one JSON object per step/epoch record), TensorBoard
event files, and the human progress line with rate and ETA."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from xmodal.storage import DirectoryMirror, join, read_bytes

JSONL = "metrics.jsonl"


class MetricsLogger:
    """Appends to ``<run_dir>/metrics.jsonl`` and ``<run_dir>/tb/`` (appending keeps a resumed run's history).

    ``run_dir`` may be a local/shared folder or an object-store URI: records are written to a
    local staging folder on this worker and mirrored to ``run_dir`` after every epoch record and
    at least every ``sync_every_s`` seconds, so no node needs to see another node's disk.
    """

    def __init__(
        self, run_dir: str | Path, sync_every_s: float = 60.0, filesystem: pafs.FileSystem | None = None
    ):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = str(run_dir)
        self.sync_every_s = sync_every_s
        self._staging = Path(tempfile.mkdtemp(prefix="xmodal-metrics-"))
        previous = read_bytes(join(self.run_dir, JSONL), filesystem)
        if previous:  # a resumed run: keep its history in the file we append to
            (self._staging / JSONL).write_bytes(previous if previous.endswith(b"\n") else previous + b"\n")
        self._mirror = DirectoryMirror(self._staging, self.run_dir, filesystem)
        self._jsonl = open(self._staging / JSONL, "a", buffering=1)
        self._tb = SummaryWriter(str(self._staging / "tb"))
        self._last_sync = time.monotonic()

    def log(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        rec = {"kind": kind, "step": step, "time": time.time(), **metrics}
        self._jsonl.write(json.dumps(rec) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self._tb.add_scalar(f"{kind}/{k}", v, step)
        if kind == "epoch" or time.monotonic() - self._last_sync >= self.sync_every_s:
            self.sync()

    def sync(self) -> None:
        """Flush both writers and mirror what changed to ``run_dir``."""
        self._jsonl.flush()
        self._tb.flush()
        self._mirror.sync()
        self._last_sync = time.monotonic()

    def close(self) -> None:
        self._jsonl.close()
        self._tb.close()
        self._mirror.sync()
        shutil.rmtree(self._staging, ignore_errors=True)


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
    if "logit_scale" in metrics:  # contrastive losses only: DINO has no logit scale
        parts.append(f"scale {metrics['logit_scale']:.2f}")
    parts += [
        f"{metrics.get('samples_per_s', 0):.0f} samples/s",
        f"data-wait {100 * metrics.get('data_wait_frac', 0):.0f}%",
        f"ETA {format_duration(eta)}",
    ]
    return " | ".join(parts)
