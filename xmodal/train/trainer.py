"""The pretraining job on the driver: builds the Ray Data input and the ``TorchTrainer``, runs it,
and reports the best checkpoint. Re-running with the same run name resumes from its last checkpoint.

``train.storage_path`` may be a shared folder or an object-store URI (``s3://...``): checkpoints go
there through Ray Train, metrics through ``MetricsLogger`` on rank 0, ``summary.json`` from here,
all through pyarrow filesystems (``xmodal.storage``)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from xmodal.config import Config
from xmodal.data.quarantine import DataError
from xmodal.data.schema import parquet_files
from xmodal.storage import durable, join, write_text
from xmodal.train.checks import check_train_config
from xmodal.train.metrics import format_duration

UNLABELLED = ("", "unlabelled", "unlabeled")  # label values that mean none (xmodal/eval/embeddings.py)


@dataclass
class PretrainResult:
    run_dir: str  # local path or URI, as ``train.storage_path`` was given
    best_checkpoint: str | None
    best_metrics: dict[str, Any]
    last_metrics: dict[str, Any]

    def summary(self) -> str:
        scores = ", ".join(
            f"{k[4:]} {100 * v:.1f}%"
            for k, v in self.best_metrics.items()
            if k.startswith("val_") and "-" in k and isinstance(v, float)
        )
        return (
            f"run folder:      {self.run_dir}\n"
            f"best checkpoint: {self.best_checkpoint} (epoch {self.best_metrics.get('epoch')})\n"
            f"validation:      {scores or 'no labelled validation set'}"
        )


def count_modalities(path: str) -> tuple[int, int, int]:
    """(paired, image-only, profile-only) particle counts, read from Parquet columns only."""
    counts = np.zeros(3, dtype=np.int64)
    for f in parquet_files(path):
        t = pq.read_table(f, columns=["has_image", "has_profile"])
        image, profile = t.column("has_image").to_numpy(), t.column("has_profile").to_numpy()
        counts += [np.sum(image & profile), np.sum(image & ~profile), np.sum(~image & profile)]
    paired, image_only, profile_only = (int(c) for c in counts)
    return paired, image_only, profile_only


def count_labelled(path: str) -> int:
    """Particles with a label, as the validation protocol reads them (null, '' and 'unlabelled' are none)."""
    n = 0
    for f in parquet_files(path):
        labels = pq.read_table(f, columns=["label"]).column("label").to_pylist()
        n += sum(v is not None and str(v).strip().lower() not in UNLABELLED for v in labels)
    return n


def check_train_data(cfg: Config) -> int:
    """The data checks that need no Ray: enough paired particles for one batch, a labelled
    ``data.val``. Returns the paired count. DataError (one line) names the key and the folder."""
    d, batch = cfg.data, cfg.optim.batch_size
    try:
        paired, image_only, profile_only = count_modalities(d.train)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"data.train={d.train}: {e}") from None
    if paired < batch:
        # a set of mostly one-modality particles (an export whose images and pulses do not match)
        # has many particles but few pairs: say so, or the count looks wrong
        unpaired = [
            f"{n} {what}"
            for n, what in ((image_only, "only an image"), (profile_only, "only a profile"))
            if n
        ]
        why = f" ({' and '.join(unpaired)}: pretraining uses only pairs)" if unpaired else ""
        raise DataError(
            f"data.train={d.train}: {paired} particles with both an image and a profile{why}, fewer "
            f"than one global batch (optim.batch_size={batch}); lower optim.batch_size or add paired data"
        )
    if d.val:
        try:
            labelled = count_labelled(d.val)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"data.val={d.val}: {e}") from None
        if not labelled:
            raise DataError(
                f"data.val={d.val}: this folder holds no labelled particles (every label is null or "
                "'unlabelled'); the per-epoch validation score is gallery k-NN accuracy on a labelled set: point "
                "data.val at one (e.g. data/SEA from `xmodal synth`), or set it empty (--set data.val=) "
                "to train without validation"
            )
    return paired


def run_name(cfg: Config, name: str | None) -> str:
    return name or cfg.train.name or time.strftime("pretrain-%Y%m%d-%H%M%S")


def build_trainer(
    cfg: Config, name: str, callbacks: list[Any] | None = None, storage_path: str | None = None
):
    """The ``TorchTrainer`` for ``cfg`` (also used by Tune trials)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from xmodal.data.pipeline import load_labelled, load_sample, train_dataset
    from xmodal.train.loop import train_loop_per_worker

    check_train_config(cfg)  # before any data is read (Tune trials start here, not in pretrain)
    storage = durable(storage_path or cfg.train.storage_path, "train.storage_path")
    n_train = check_train_data(cfg)
    workers = cfg.train.num_workers
    d, n_center = cfg.data, cfg.model.center_particles
    # shipped through the object store so workers never need the driver's disk
    val = center = None
    if d.val:
        val = ray.put(
            load_labelled(d.val, d.image_size, d.profile_length, d.val_max_particles, d.seed, d.image_norm)
        )
    if n_center:
        center = ray.put(load_sample(d.train, d.image_size, d.profile_length, n_center, d.seed, d.image_norm))
    micro_bs = cfg.optim.batch_size // workers // cfg.optim.grad_accum  # exact: checked above
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "val": val,
            "center": center,
            "n_train": n_train,
            "run_dir": join(storage, name),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="val_score", checkpoint_score_order="max"
            ),
            callbacks=callbacks or None,
        ),
        datasets={"train": train_dataset(cfg.data, augment=True, batch_size=micro_bs)},
    ), storage


def pretrain(cfg: Config, address: str | None = None, name: str | None = None) -> PretrainResult:
    """Run (or resume) pretraining; returns where the best checkpoint is and its scores."""
    from xmodal.runtime import init_ray

    check_train_config(cfg)  # before Ray starts
    check_train_data(cfg)
    init_ray(address)
    name = run_name(cfg, name)
    t0 = time.time()
    trainer, storage = build_trainer(cfg, name)
    print(
        f"[xmodal] pretraining '{name}': {cfg.model.image_encoder} + {cfg.model.profile_encoder}, "
        f"loss {cfg.loss.name}, {cfg.optim.epochs} epochs, {cfg.train.num_workers} workers -> {storage}/{name}",
        flush=True,
    )
    result = trainer.fit()
    run_dir = join(storage, name)
    best_ckpt, best_metrics = None, dict(result.metrics or {})
    if result.best_checkpoints:
        ckpt, best_metrics = max(
            result.best_checkpoints, key=lambda cm: cm[1].get("val_score", float("-inf"))
        )
        # Ray gives the path inside its filesystem (no scheme); checkpoints sit directly in the run folder
        best_ckpt = join(run_dir, Path(ckpt.path).name)
    out = PretrainResult(run_dir, best_ckpt, best_metrics, dict(result.metrics or {}))
    write_text(
        join(run_dir, "summary.json"),
        json.dumps(
            {
                "best_checkpoint": best_ckpt,
                "best_metrics": best_metrics,
                "last_metrics": out.last_metrics,
                "wall_time_s": time.time() - t0,
            },
            indent=1,
            default=str,
        ),
    )
    print(
        f"[xmodal] pretraining finished in {format_duration(time.time() - t0)}\n{out.summary()}", flush=True
    )
    return out
