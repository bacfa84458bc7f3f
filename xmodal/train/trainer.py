"""The pretraining job on the driver: builds the Ray Data input and the ``TorchTrainer``, runs it,
and reports the best checkpoint. Re-running with the same run name resumes from its last checkpoint.

``train.storage_path`` may be a shared folder or an object-store URI (``s3://...``): checkpoints go
there through Ray Train, metrics through ``MetricsLogger`` on rank 0, ``summary.json`` from here,
all through pyarrow filesystems (``xmodal.storage``)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from xmodal.config import Config, ConfigError, config_from_dict
from xmodal.data.quarantine import DataError
from xmodal.data.schema import UNLABELLED, parquet_files
from xmodal.storage import durable, join, read_bytes, resolve, write_text
from xmodal.train.checks import check_train_config
from xmodal.train.metrics import format_duration

# Ray Data's read and preprocessing tasks ask for one CPU each: with less than that left beside the
# training workers none of them is ever scheduled and the first epoch waits forever.
DATA_CPUS = 1.0
NO_VAL_BEST = "no data.val: best = last"  # how the best checkpoint is chosen without a labelled set


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
            f"validation:      {scores or NO_VAL_BEST + ' (the latest epoch)'}"
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
        n += sum(v is not None and str(v).strip().casefold() not in UNLABELLED for v in labels)
    return n


def check_train_data(cfg: Config) -> int:
    """The data checks that need no Ray: enough training particles for one batch (pairs, or for an
    image-only loss such as DINO particles with an image), a labelled ``data.val``. Returns the
    count of training particles. DataError (one line) names the key and the folder."""
    from xmodal.models.build import trained_modalities

    d, batch = cfg.data, cfg.optim.batch_size
    try:
        paired, image_only, profile_only = count_modalities(d.train)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"data.train={d.train}: {e}") from None
    if "profile" not in trained_modalities(cfg):
        images = paired + image_only
        if images < batch:
            raise DataError(
                f"data.train={d.train}: {images} particles with an image, fewer than one global batch "
                f"(optim.batch_size={batch}; loss.name={cfg.loss.name} trains on images only); lower "
                "optim.batch_size or add images"
            )
        n_train = images
    elif paired < batch:
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
    else:
        n_train = paired
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
    return n_train


def run_name(cfg: Config, name: str | None) -> str:
    return name or cfg.train.name or time.strftime("pretrain-%Y%m%d-%H%M%S")


def build_trainer(
    cfg: Config,
    name: str,
    callbacks: list[Any] | None = None,
    storage_path: str | None = None,
    n_train: int | None = None,
):
    """The ``TorchTrainer`` for ``cfg`` (also used by Tune trials). ``n_train``: what
    ``check_train_data`` returned when the caller ran the checks already (``pretrain``, before Ray)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from xmodal.data.pipeline import load_labelled, load_sample, train_dataset
    from xmodal.models.build import trained_modalities
    from xmodal.train.loop import train_loop_per_worker

    if n_train is None:  # Tune trials start here, not in pretrain
        check_train_config(cfg)  # before any data is read
        n_train = check_train_data(cfg)
    storage = durable(storage_path or cfg.train.storage_path, "train.storage_path")
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
            # without a labelled data.val there is no score (a falling training loss ranks nothing:
            # DINO's rises while it learns): the latest checkpoint is kept, and is the best
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1,
                checkpoint_score_attribute="val_score" if d.val else None,
                checkpoint_score_order="max",
            ),
            callbacks=callbacks or None,
        ),
        datasets={
            "train": train_dataset(
                cfg.data,
                augment=True,
                batch_size=micro_bs,
                paired="profile" in trained_modalities(cfg),
            )
        },
    ), storage


def _fitting_workers(cfg: Config, cpus: float) -> str:
    """``--set`` options of CPU workers that fit ``cpus`` beside data loading, with a worker count
    that still divides optim.batch_size; "" when nothing fits."""
    spare = cpus - DATA_CPUS
    if spare < 0.5:
        return ""
    t, o = cfg.train, cfg.optim
    workers = next(
        w
        for w in range(min(t.num_workers, int(spare / 0.5)), 0, -1)  # at least half a CPU each
        if o.batch_size % (w * o.grad_accum) == 0
    )
    per = math.floor(spare / workers * 100) / 100
    sets = [f"train.cpus_per_worker={per:g}"]
    if workers != t.num_workers:
        sets.insert(0, f"train.num_workers={workers}")
    return " ".join(f"--set {x}" for x in sets)


def check_resources(cfg: Config, joined: bool) -> None:
    """The training workers and data loading must fit the Ray cluster, or Ray Train waits for
    resources forever (and Ray Data prints that it may hang). A local cluster cannot grow: a
    one-line ConfigError with the numbers and settings that fit. A joined cluster may autoscale: a
    warning."""
    import ray

    t = cfg.train
    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    need = t.num_workers * t.cpus_per_worker
    fit = _fitting_workers(cfg, cpus)
    if t.use_gpu and gpus < t.num_workers:
        problem = (
            f"train.use_gpu=true with train.num_workers={t.num_workers} asks for {t.num_workers} GPUs (one "
            f"per worker), and this Ray cluster has {gpus:g}"
        )
        fix = f"train on CPUs: --set train.use_gpu=false {fit}".rstrip() if fit else "use a machine with GPUs"
    elif need + DATA_CPUS > cpus:
        problem = (
            f"train.num_workers x train.cpus_per_worker = {t.num_workers} x {t.cpus_per_worker:g} = "
            f"{need:g} CPUs for training plus {DATA_CPUS:g} for data loading (Ray Data) need "
            f"{need + DATA_CPUS:g}, and this Ray cluster has {cpus:g}"
        )
        fix = f"set {fit}" if fit else f"use a machine with at least {DATA_CPUS + 0.5:g} CPUs"
    else:
        return
    if joined:
        print(
            f"[xmodal] warning: {problem}: training waits until the cluster grows (autoscaling); "
            f"otherwise {fix}",
            file=sys.stderr,
            flush=True,
        )
        return
    raise ConfigError(f"{problem}: training would wait forever; {fix}")


# Keys whose change a resumed run takes in its stride: the initial weights file is never read
# when a checkpoint's weights follow (and may be gone).
RESUME_FREE = ("model.pretrained_path",)


def _flat(d: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resumable(cfg: Config, name: str, run_dir: str) -> None:
    """Re-running a run's name resumes from its newest checkpoint, whose weights fit only the model
    and loss they were trained with, and whose optimizer state only the same optimizer (optim.name):
    another is a one-line ConfigError naming the keys, not a state-dict size mismatch (or KeyError)
    in every worker, retried train.max_failures times."""
    fs, path = resolve(run_dir)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    # Ray Train names checkpoints by their time (checkpoint_2026-11-28_18-29-19.545953): newest last
    ckpts = sorted(
        i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
    )
    text = read_bytes(f"{ckpts[-1]}/config.yaml", fs) if ckpts else None
    if text is None:
        return
    try:
        old = config_from_dict(yaml.safe_load(text)).to_dict()
    except (ConfigError, yaml.YAMLError):
        return  # a config this version cannot read: loading its weights is the workers' to judge
    new = cfg.to_dict()
    diffs = []
    for section in ("model", "loss"):
        a, b = _flat(old[section], f"{section}."), _flat(new[section], f"{section}.")
        for key in sorted(set(a) | set(b)):
            if key not in RESUME_FREE and a.get(key) != b.get(key):
                diffs.append(f"{key} {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}")
    # the optimizer's other settings may change (the loop applies them), its kind may not: the saved
    # optimizer state of one kind does not load into another (KeyError 'step' in every worker)
    optim = old["optim"].get("name") != new["optim"].get("name")
    if optim:
        diffs.append(f"optim.name {old['optim'].get('name')!r} -> {new['optim'].get('name')!r}")
    if diffs:
        settings = "model/loss/optimizer" if optim else "model/loss"
        raise ConfigError(
            f"run '{name}' ({run_dir}) was trained with other {settings} settings and re-running its name "
            f"resumes it: {'; '.join(diffs)}; pick another --name, or keep the run's settings "
            f"(--config {join(run_dir, Path(ckpts[-1]).name, 'config.yaml')})"
        )


def pretrain(cfg: Config, address: str | None = None, name: str | None = None) -> PretrainResult:
    """Run (or resume) pretraining; returns where the best checkpoint is and its scores."""
    from xmodal.runtime import init_ray

    check_train_config(cfg)  # before Ray starts
    n_train = check_train_data(cfg)
    name = run_name(cfg, name)
    check_resumable(cfg, name, join(durable(cfg.train.storage_path, "train.storage_path"), name))
    init_ray(address)
    check_resources(cfg, joined=bool(address or os.environ.get("RAY_ADDRESS")))
    t0 = time.time()
    trainer, storage = build_trainer(cfg, name, n_train=n_train)
    print(
        f"[xmodal] pretraining '{name}': {cfg.model.image_encoder} + {cfg.model.profile_encoder}, "
        f"loss {cfg.loss.name}, {cfg.optim.epochs} epochs, {cfg.train.num_workers} workers -> {storage}/{name}",
        flush=True,
    )
    result = trainer.fit()
    run_dir = join(storage, name)
    best_ckpt, best_metrics = None, dict(result.metrics or {})
    if not cfg.data.val:  # NO_VAL_BEST: Ray kept only the latest checkpoint
        if result.checkpoint is not None:
            best_ckpt = join(run_dir, Path(result.checkpoint.path).name)
    elif result.best_checkpoints:
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
                "best_by": f"val_score ({cfg.eval.val_combo} on data.val)" if cfg.data.val else NO_VAL_BEST,
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
