"""Accuracy of a short CPU schedule vs the initial logit scale (1/temperature): the laptop config
trained on the demo's pools at CLIP's 1/0.07 and at the paper's e, several seeds each, same data and
protocol in one run. A single-process loop over the same preprocessing and augmentation as the Ray
pipeline (what is compared is the loss setting, not the distribution), then the gallery k-NN
protocol on LAB (single mode, k = 3, 5 repeats); the random-weight model of each seed as reference.

    python bench/bench_logit_scale.py [--seeds 3] [--epochs 5] [--scales 14.285714 2.718282]

Prints accuracy per seed and the mean difference to the first scale. ~2.5 min per run on 2 cores.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch

from xmodal.config import load_config
from xmodal.data.pipeline import COLUMNS, load_labelled, table_to_model_batch
from xmodal.data.schema import read_table
from xmodal.data.synth import synthesize
from xmodal.data.transforms import Augment
from xmodal.eval.embed import MODEL_KEYS, embed_arrays, embedding_set
from xmodal.eval.protocol import run_protocol
from xmodal.models.build import build_model
from xmodal.train.optim import build_optimizer, build_scheduler

REPO = Path(__file__).resolve().parents[1]
COMBOS = ("I-I", "P-P", "I+P-I+P", "I-P")
SIZES = (1, 4, 16)


def scores(model, lab: dict) -> dict[str, list[float]]:
    es = embedding_set(lab, embed_arrays(model, lab, torch.device("cpu")))
    r = run_protocol(es, None, COMBOS, SIZES, 3, 5, 0, progress=False)
    return {c: [100 * r.cell(c, n, 3).mean() for n in SIZES] for c in COMBOS}


def train(cfg, pool, lab: dict, seed: int) -> tuple[dict, dict, torch.nn.Module]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model(cfg)
    random_scores = scores(model, lab)
    bs, n = cfg.optim.batch_size, pool.num_rows
    steps = n // bs
    opt = build_optimizer(model.param_groups(cfg.optim.weight_decay), cfg.optim)
    sched = build_scheduler(opt, cfg.optim, steps)
    aug = Augment.from_config(cfg.data.augment)
    model.train()
    for _ in range(cfg.optim.epochs):
        order = rng.permutation(n)
        for s in range(steps):
            rows = pool.take(order[s * bs : (s + 1) * bs])
            b = table_to_model_batch(
                rows, cfg.data.image_size, cfg.data.profile_length, aug, rng, cfg.data.image_norm
            )
            loss, _ = model({k: torch.as_tensor(b[k]) for k in MODEL_KEYS})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            model.after_step(0.0)
    return random_scores, scores(model, lab), model


def demo_pool(data: Path, n_sea: int = 0):
    """The demo's data (make demo) written to ``data``: 4000 unlabelled UTO particles to train, 1200
    labelled LAB (and ``n_sea`` SEA); returns the UTO particles that have both modalities."""
    synthesize(data, n_lab=1200, n_sea=n_sea, n_uto=4000, seed=0, fmt="parquet", image_size=64)
    pool = read_table(str(data / "UTO"), columns=COLUMNS)
    return pool.filter(pc.and_(pool.column("has_image"), pool.column("has_profile")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--scales", type=float, nargs="+", default=[1 / 0.07, np.e])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        pool = demo_pool(data)
        laptop = load_config(REPO / "configs" / "laptop.yaml", [f"optim.epochs={args.epochs}"])
        lab = load_labelled(
            str(data / "LAB"),
            laptop.data.image_size,
            laptop.data.profile_length,
            image_norm=laptop.data.image_norm,
        )
        results: dict[float, list[dict]] = {}
        for scale in args.scales:
            cfg = load_config(
                REPO / "configs" / "laptop.yaml", [f"loss.logit_scale={scale}", f"optim.epochs={args.epochs}"]
            )
            for seed in range(args.seeds):
                rand, trained, _ = train(cfg, pool, lab, seed)
                results.setdefault(scale, []).append(trained)
                for tag, sc in (("random", rand), (f"scale {scale:.3g}", trained)):
                    line = "  ".join(f"{c} " + "/".join(f"{v:.1f}" for v in sc[c]) for c in COMBOS)
                    print(f"seed {seed} {tag:>12}: {line}   (n = {'/'.join(map(str, SIZES))})", flush=True)
    first = args.scales[0]
    print(
        f"\nmean accuracy (%) over {args.seeds} seeds at n = {SIZES[-1]}, and difference to scale {first:.3g}:"
    )
    ref = {c: np.mean([r[c][-1] for r in results[first]]) for c in COMBOS}
    for scale, runs in results.items():
        means = {c: np.mean([r[c][-1] for r in runs]) for c in COMBOS}
        print(
            f"  scale {scale:7.3f}: "
            + "  ".join(f"{c} {means[c]:.1f} ({means[c] - ref[c]:+.1f})" for c in COMBOS)
        )


if __name__ == "__main__":
    main()
