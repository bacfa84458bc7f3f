"""GPU pretraining check (run by bench/gpu_check.sh on a GPU node; needs CUDA + the xmodal stack).

efficientnet_b0 + 1-D CNN at 224 px, bf16 autocast, channels_last, through the real Ray Data + Ray Train
path: samples/s per GPU, the data-wait fraction, and model FLOP utilisation (MFU = achieved model
FLOP/s / the GPU's dense bf16 peak; model FLOPs counted with torch's FlopCounterMode, x3 for fwd+bwd).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# dense bf16 tensor-core peaks (TFLOP/s), by the name torch reports
PEAK_BF16 = {"H100 80GB HBM3": 989.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


def model_flops_per_sample(cfg) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from xmodal.models.build import build_model

    m = build_model(cfg)
    s, length = cfg.data.image_size, cfg.data.profile_length
    b = {
        "image": torch.zeros(2, 1, s, s),
        "image_meta": torch.zeros(2, 2),
        "profile": torch.zeros(2, 6, length),
        "profile_mask": torch.ones(2, length, dtype=torch.bool),
        "profile_meta": torch.zeros(2, 1),
        "has_image": torch.ones(2, dtype=torch.bool),
        "has_profile": torch.ones(2, dtype=torch.bool),
    }
    with FlopCounterMode(display=False) as fc:
        m.embed(b)
    return 3.0 * fc.get_total_flops() / 2  # forward x3 ~ forward + backward


def main() -> None:
    from xmodal.config import load_config
    from xmodal.data.schema import parquet_files
    from xmodal.data.synth import synthesize
    from xmodal.runtime import init_ray
    from xmodal.train.trainer import pretrain

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--gpus", type=int, default=max(1, torch.cuda.device_count()))
    ap.add_argument("--cpus-per-worker", type=int, default=2, help="the rest of the node preprocesses")
    ap.add_argument(
        "--repeat", type=int, default=1, help="read the synthetic shards this many times per epoch"
    )
    ap.add_argument(
        "--set", nargs="*", default=[], help="extra config overrides (a CPU dry run: train.use_gpu=false ...)"
    )
    ap.add_argument("--out", help="also write the numbers to this JSON file")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="xmodal-gpu-"))
    t0 = time.perf_counter()
    synthesize(work / "data", 0, 0, args.n, seed=0, fmt="parquet", image_size=224)
    print(f"[bench] synth {args.n} particles at 224 px: {time.perf_counter() - t0:.0f} s", flush=True)
    # Longer epochs without the synthesis time: each shard read `repeat` times per epoch (Ray Data
    # restarts its pipeline every epoch; a short epoch would mostly measure that ramp-up).
    for f in parquet_files(work / "data" / "UTO"):
        for r in range(1, args.repeat):
            shutil.copy(f, f.with_name(f"{f.stem}-copy{r}.parquet"))
    cfg = load_config(
        "configs/paper_efficientnet_b0_cnn_clip.yaml",
        [
            f"data.train={work / 'data' / 'UTO'}",
            "data.val=",
            f"optim.epochs={args.epochs}",
            f"optim.batch_size={args.batch_size * args.gpus}",
            f"train.num_workers={args.gpus}",
            f"train.cpus_per_worker={args.cpus_per_worker}",
            f"train.storage_path={work / 'runs'}",
            "train.checkpoint_every=1000",
            *args.set,
        ],
    )
    # A benchmark needs no dashboard, and a node without ray[default] has none: the same path either way.
    init_ray(include_dashboard=False)
    res = pretrain(cfg, name="gpu-bench")
    rows = [json.loads(x) for x in (Path(res.run_dir) / "metrics.jsonl").read_text().splitlines()]
    ep = [r for r in rows if r["kind"] == "epoch"][1:] or [r for r in rows if r["kind"] == "epoch"]
    rate = float(np.mean([r["samples_per_s"] for r in ep]))
    wait = float(np.mean([r["data_wait_frac"] for r in ep]))
    flops = model_flops_per_sample(cfg)
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    peak = peak_tflops(name)
    per_gpu = rate / args.gpus
    mfu = per_gpu * flops / (peak * 1e12) if peak else float("nan")
    print(f"device: {name} x{args.gpus}; torch {torch.__version__}")
    print(
        f"{cfg.model.image_encoder} + {cfg.model.profile_encoder}, {cfg.data.image_size} px, "
        f"{cfg.train.precision}: {per_gpu:.0f} samples/s per GPU, data-wait {100 * wait:.1f}%, "
        f"{flops / 1e9:.2f} GFLOP/sample (fwd+bwd), MFU {100 * mfu:.1f}%"
    )
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "device": name,
                    "gpus": args.gpus,
                    "torch": torch.__version__,
                    "epochs": [
                        {k: r.get(k) for k in ("epoch", "samples_per_s", "data_wait_frac", "train_loss")}
                        for r in ep
                    ],
                    "samples_per_s_per_gpu": per_gpu,
                    "data_wait_frac": wait,
                    "gflop_per_sample": flops / 1e9,
                    "mfu": mfu,
                    "overrides": args.set,
                    "particles_per_epoch": args.n * args.repeat,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
