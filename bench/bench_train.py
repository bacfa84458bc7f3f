"""Training throughput: xmodal's Ray Data + Ray Train path (2 workers) vs a plain single-process
PyTorch loop over a per-sample Dataset that opens each PNG and reads each profile CSV with
``np.loadtxt`` (the paper's data path). Same model, same batch size, same data, same run.

    python bench/bench_train.py [--n 1024] [--image-encoder efficientnet_b0] [--image-size 64] [--epochs 3]

Prints samples/s and the data-wait fraction of both, and their ratio. Steady state: the first epoch
of each path (Ray start-up, worker start, allocator warm-up) is excluded.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from xmodal.config import load_config
from xmodal.data.schema import N_CHANNELS
from xmodal.data.synth import synthesize
from xmodal.data.transforms import META_NORM, normalise_profile, resample, resize_and_pad
from xmodal.models.build import build_model
from xmodal.storage import join, read_bytes


class PlainDataset(torch.utils.data.Dataset):
    """One particle per __getitem__: PIL.open + np.loadtxt, as the authors' code reads the SYKE layout."""

    def __init__(self, root: Path, image_size: int, profile_length: int):
        with open(root / "annotations.csv") as f:
            self.rows = list(csv.DictReader(f))
        self.root, self.size, self.length = root, image_size, profile_length
        self.rng = np.random.default_rng(0)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        r = self.rows[i]
        with Image.open(self.root / r["image"]) as im:
            img = np.asarray(im.convert("L"))
        prof = np.loadtxt(self.root / r["profile"], delimiter=",", skiprows=1, ndmin=2).T.astype(np.float32)
        assert prof.shape[0] == N_CHANNELS
        x = resize_and_pad(img, self.size)[None].astype(np.float32) * (2 / 255) - 1
        p = normalise_profile(resample(prof, self.length))
        if self.rng.random() < 0.5:  # the paired flip
            x, p = x[..., ::-1].copy(), p[..., ::-1].copy()
        return {
            "image": torch.from_numpy(x),
            "image_meta": torch.tensor(np.log1p(img.shape) / META_NORM, dtype=torch.float32),
            "profile": torch.from_numpy(p),
            "profile_mask": torch.ones(self.length, dtype=torch.bool),
            "profile_meta": torch.tensor([np.log1p(prof.shape[1]) / META_NORM], dtype=torch.float32),
            "has_image": torch.tensor(True),
            "has_profile": torch.tensor(True),
        }


def plain_loop(cfg, root: Path, epochs: int) -> dict[str, float]:
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.param_groups(cfg.optim.weight_decay), lr=cfg.optim.lr)
    ds = PlainDataset(root, cfg.data.image_size, cfg.data.profile_length)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.optim.batch_size, shuffle=True, drop_last=True)
    rates, waits = [], []
    for epoch in range(epochs):
        t0 = time.time()
        wait = n = 0.0
        t_fetch = time.time()
        for batch in loader:
            wait += time.time() - t_fetch
            loss, _ = model(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += batch["image"].shape[0]
            t_fetch = time.time()
        dt = time.time() - t0
        print(
            f"  plain epoch {epoch + 1}: {n / dt:.1f} samples/s, data-wait {100 * wait / dt:.0f}%", flush=True
        )
        if epoch > 0:
            rates.append(n / dt)
            waits.append(wait / dt)
    return {"samples_per_s": float(np.mean(rates)), "data_wait_frac": float(np.mean(waits))}


def kernel_ab(cfg, root: Path, rounds: int) -> tuple[float, float]:
    """Median CPU ms per training step, one thread, per-worker batch: the stock model (as the
    plain loop runs it) vs the model as xmodal's CPU workers run it (``use_small_map_kernels``, and
    NHWC with ``train.channels_last``), steps interleaved so both see the same machine."""
    import copy
    import statistics

    from xmodal.models.cpu_kernels import use_small_map_kernels

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    stock = build_model(cfg)
    fast = copy.deepcopy(stock)
    use_small_map_kernels(fast)
    layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    fast = fast.to(memory_format=layout)
    ds = PlainDataset(root, cfg.data.image_size, cfg.data.profile_length)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.optim.batch_size // cfg.train.num_workers)
    batch = next(iter(loader))
    fast_batch = {**batch, "image": batch["image"].contiguous(memory_format=layout)}
    runs = [
        (m, b, torch.optim.AdamW(m.parameters(), lr=cfg.optim.lr), [])
        for m, b in ((stock, batch), (fast, fast_batch))
    ]
    for i in range(rounds + 2):
        for model, b, opt, times in runs:
            t0 = time.process_time()
            loss, _ = model(b)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= 2:  # allocator warm-up
                times.append(time.process_time() - t0)
    torch.set_num_threads(threads)
    return tuple(1000 * statistics.median(t) for _, _, _, t in runs)


def xmodal_path(cfg) -> dict[str, float]:
    from xmodal.train.trainer import pretrain

    result = pretrain(cfg, name="bench")
    lines = [json.loads(x) for x in read_bytes(join(result.run_dir, "metrics.jsonl")).decode().splitlines()]
    ep = [r for r in lines if r["kind"] == "epoch"][1:]
    return {
        "samples_per_s": float(np.mean([r["samples_per_s"] for r in ep])),
        "data_wait_frac": float(np.mean([r["data_wait_frac"] for r in ep])),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--image-encoder", default="efficientnet_b0")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--kernel-rounds", type=int, default=8, help="steps per model in the kernel A/B (0: skip)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for xmodal's run")
    ap.add_argument("--skip-plain", action="store_true", help="xmodal's path only (no ratio)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="xmodal-bench-train-"))
    # no scale-bar band, so both paths train on the same crops
    synthesize(work / "syke", 0, 0, args.n, seed=0, fmt="syke", image_size=args.image_size, header_px=0)
    synthesize(work / "pq", 0, 0, args.n, seed=0, fmt="parquet", image_size=args.image_size)
    cfg = load_config(
        "configs/laptop.yaml",
        [
            f"data.train={work / 'pq' / 'UTO'}",
            "data.val=",
            f"data.image_size={args.image_size}",
            f"model.image_encoder={args.image_encoder}",
            f"optim.batch_size={args.batch_size}",
            f"optim.epochs={args.epochs}",
            f"train.storage_path={work / 'runs'}",
            "train.checkpoint_every=1000",
            *args.set,
        ],
    )
    print(
        f"model {args.image_encoder} + cnn at {args.image_size} px, batch {args.batch_size}, "
        f"{args.n} particles, {args.epochs} epochs (first excluded)"
    )
    if args.kernel_rounds:
        stock_ms, fast_ms = kernel_ab(cfg, work / "syke" / "UTO", args.kernel_rounds)
        print(
            f"one step, 1 thread, batch {cfg.optim.batch_size // cfg.train.num_workers}: stock model "
            f"{stock_ms:.0f} ms CPU, as xmodal runs it (small-map kernels, NHWC) {fast_ms:.0f} ms "
            f"({stock_ms / fast_ms:.2f}x)"
        )
    # the plain loop first: Ray's daemons stay up after xmodal's run and would slow it down
    plain = None if args.skip_plain else plain_loop(cfg, work / "syke" / "UTO", args.epochs)
    ours = xmodal_path(cfg)
    if plain is not None:
        print(
            f"plain loop (1 process, per-file PIL + np.loadtxt): {plain['samples_per_s']:.1f} samples/s, "
            f"data-wait {100 * plain['data_wait_frac']:.0f}%"
        )
    print(
        f"xmodal (Ray Data + Ray Train, {cfg.train.num_workers} workers):  {ours['samples_per_s']:.1f} samples/s, "
        f"data-wait {100 * ours['data_wait_frac']:.0f}%"
    )
    if plain is not None:
        print(f"ratio xmodal / plain: {ours['samples_per_s'] / plain['samples_per_s']:.2f}x")


if __name__ == "__main__":
    main()
