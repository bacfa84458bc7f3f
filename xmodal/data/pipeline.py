"""Ray Data pipelines: Parquet shards -> preprocessed, augmented model batches.

Decode, resize-and-pad, profile normalisation/resampling and the paired augmentations all run in
``map_batches`` on Ray Data's CPU tasks, so training workers only receive ready float tensors
(heavy work never runs in a collate function or in the training process).
"""

from __future__ import annotations

import os
import zlib
from itertools import count
from typing import Any

import numpy as np

from xmodal.config import DataConfig
from xmodal.data.schema import parquet_files, read_table, sample_table
from xmodal.data.transforms import Augment, to_model_batch

COLUMNS = [
    "particle_id",
    "has_image",
    "image",
    "image_height",
    "image_width",
    "has_profile",
    "profile",
    "profile_length",
]
_calls = count()


def _batch_rng(seed: int, particle_ids: Any) -> np.random.Generator:
    """Seeded per batch from the config seed and the batch's particles; the process id and a
    per-process call counter make each epoch's draw differ (Ray Data streams batches in varying
    order, so runs are statistically, not bitwise, reproducible)."""
    ids = zlib.crc32("|".join(map(str, particle_ids[:4])).encode())
    return np.random.default_rng([seed, ids, os.getpid(), next(_calls)])


def preprocess_batch(
    batch: dict[str, Any],
    image_size: int,
    profile_length: int,
    augment: Augment | None,
    seed: int,
    image_norm: str = "fixed",
) -> dict[str, np.ndarray]:
    rng = _batch_rng(seed, batch["particle_id"]) if augment is not None else None
    return to_model_batch(batch, image_size, profile_length, augment, rng, image_norm)


def table_to_model_batch(
    table: Any,
    image_size: int,
    profile_length: int,
    augment: Augment | None = None,
    rng: np.random.Generator | None = None,
    image_norm: str = "fixed",
) -> dict[str, np.ndarray]:
    """Parquet rows (a pyarrow table holding ``COLUMNS``) -> model arrays, in-process."""
    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in COLUMNS if c != "profile"}
    cols["profile"] = table.column("profile").to_pylist()
    return to_model_batch(cols, image_size, profile_length, augment, rng, image_norm)


def paired_only(batch: dict[str, Any]) -> dict[str, Any]:
    """Pretraining needs both modalities; profile-only / image-only rows are for embedding."""
    keep = np.asarray(batch["has_image"], bool) & np.asarray(batch["has_profile"], bool)
    return {k: v[keep] for k, v in batch.items()}


def with_image(batch: dict[str, Any]) -> dict[str, Any]:
    """The image-only DINO baseline trains on every particle with an image, profile or not
    (image-only instruments, or an export whose pulses were lost)."""
    keep = np.asarray(batch["has_image"], bool)
    return {k: v[keep] for k, v in batch.items()}


def read_parquet(files: list[str], **kwargs: Any):
    """``ray.data.read_parquet`` through Ray Data's first (V1) Parquet datasource.

    Ray 2.60 reads Parquet through DataSourceV2 by default, which starts 32 footer-reader actors
    and a listing task for every execution, i.e. every epoch: on 2 CPUs that took 4-25 s per epoch
    for 960 particles (~0.5 s of decoding), where V1 took 1.3-2.2 s (measured with
    bench/bench_train.py's data; see bench/RESULTS.md). Our inputs are explicit file lists, so
    nothing of V2's listing is needed; the flag is restored afterwards because the context is
    process-wide."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(files, **kwargs)
    finally:
        ctx.use_datasource_v2 = before


SHUFFLES = ("global", "local", "none")  # see DataConfig.shuffle
LOCAL_SHUFFLE_BATCHES = 8  # micro-batches of rows a worker mixes with data.shuffle=local


def local_shuffle(cfg: DataConfig, micro_batch: int, seed: int) -> dict[str, int | None]:
    """``iter_torch_batches`` arguments of a worker's epoch: a shuffle buffer with "local"."""
    if cfg.shuffle != "local":
        return {}
    return {"local_shuffle_buffer_size": LOCAL_SHUFFLE_BATCHES * micro_batch, "local_shuffle_seed": seed}


def train_dataset(cfg: DataConfig, augment: bool = True, batch_size: int = 64, paired: bool = True):
    """Paired particles of ``cfg.train`` (``paired=False``: every particle with an image, for a loss
    that trains on images only) as a lazy Ray Dataset of model batches."""
    files = [str(f) for f in parquet_files(cfg.train)]
    ds = read_parquet(files, columns=COLUMNS)
    ds = ds.map_batches(paired_only if paired else with_image, batch_format="numpy")
    # a new order every epoch (every execution of the dataset), reproducible from the seed
    from ray.data import RandomSeedConfig

    seed = RandomSeedConfig(seed=cfg.seed, reseed_after_execution=True)
    if cfg.shuffle == "global":  # the encoded rows (cheaper to move than decoded images)
        ds = ds.random_shuffle(seed=seed)
    elif cfg.shuffle == "local":  # rows are mixed further as batches are drawn (local_shuffle)
        ds = ds.randomize_block_order(seed=seed)
    aug = Augment.from_config(cfg.augment) if augment else None
    return ds.map_batches(
        preprocess_batch,
        batch_size=batch_size,
        batch_format="numpy",
        fn_kwargs={
            "image_size": cfg.image_size,
            "profile_length": cfg.profile_length,
            "augment": aug,
            "seed": cfg.seed,
            "image_norm": cfg.image_norm,
        },
    )


def load_labelled(
    path: str,
    image_size: int,
    profile_length: int,
    max_particles: int = 0,
    seed: int = 0,
    image_norm: str = "fixed",
) -> dict[str, np.ndarray]:
    """A small labelled set, preprocessed in-process (no augmentation): validation galleries.

    Unlabelled rows are dropped; ``max_particles`` caps the set with a seeded, class-stratified
    subsample so rare classes stay represented.
    """
    table = read_table(path, columns=COLUMNS + ["label", "domain"])
    labels = np.asarray(table.column("label").to_pylist(), dtype=object)
    idx = np.flatnonzero(labels != None)  # noqa: E711 (element-wise None test)
    if max_particles and len(idx) > max_particles:
        # shuffle, then order by each particle's rank within its class: the first picks cover every class
        idx = np.random.default_rng(seed).permutation(idx)
        rank = np.zeros(len(idx), dtype=np.int64)
        seen: dict[Any, int] = {}
        for j, lab in enumerate(labels[idx]):
            rank[j] = seen.get(lab, 0)
            seen[lab] = rank[j] + 1
        idx = np.sort(idx[np.argsort(rank, kind="stable")[:max_particles]])
    table = table.take(idx)
    batch = table_to_model_batch(table, image_size, profile_length, image_norm=image_norm)
    batch["label"] = labels[idx]
    batch["particle_id"] = np.asarray(table.column("particle_id").to_pylist(), dtype=object)
    batch["domain"] = table.column("domain").to_numpy(zero_copy_only=False)
    return batch


def load_sample(
    path: str,
    image_size: int,
    profile_length: int,
    max_particles: int,
    seed: int = 0,
    image_norm: str = "fixed",
) -> dict[str, np.ndarray]:
    """A seeded random sample of any dataset (labels ignored), preprocessed in-process without
    augmentation: the pretraining pool's sample for the embedding center (xmodal/models/center.py)."""
    table = sample_table(path, COLUMNS, max_particles, seed)
    return table_to_model_batch(table, image_size, profile_length, image_norm=image_norm)
