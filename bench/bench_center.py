"""Embedding centring (xmodal/models/center.py) on vs off, same weights: the gallery k-NN protocol on
LAB (single mode) and LAB gallery -> SEA queries, k = 3, 5 repeats, with the model's center as
trained and with a zero center (the uncentred embeddings of the same model).

    python bench/bench_center.py                                  # trains the laptop model in-process
    python bench/bench_center.py --runs RUN_DIR... --data DATA    # pretrained runs (e.g. make demo's)

Without ``--runs`` it synthesizes the demo's data (UTO 4000, LAB 1200, SEA 600), trains the laptop
config single-process (bench/bench_logit_scale.py's loop; ~3 min on 2 cores) and sets the center
from the pool as the training loop does. ``DATA`` must hold LAB and SEA folders.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from xmodal.config import load_config
from xmodal.data.pipeline import load_labelled, load_sample
from xmodal.eval.embed import embed_arrays, embedding_set, model_from_state
from xmodal.eval.protocol import run_protocol
from xmodal.train.checkpoint import load_checkpoint, resolve_checkpoint
from xmodal.train.validate import update_center

sys.path.insert(0, str(Path(__file__).parent))
from bench_logit_scale import demo_pool, train  # noqa: E402 (the same data and single-process loop)

REPO = Path(__file__).resolve().parents[1]
IN = ("I-I", "P-P", "I+P-I+P", "I-P", "P-I")
ACROSS = ("I-I", "P-P", "I+P-I+P")
SIZES = (1, 4, 16)
CPU = torch.device("cpu")


def load_sets(cfg, data: Path) -> dict[str, dict]:
    d = cfg.data
    return {
        name: load_labelled(str(data / name), d.image_size, d.profile_length, image_norm=d.image_norm)
        for name in ("LAB", "SEA")
    }


def accuracies(model, sets: dict[str, dict]) -> dict[str, list[float]]:
    es = {name: embedding_set(b, embed_arrays(model, b, CPU)) for name, b in sets.items()}
    within = run_protocol(es["LAB"], None, IN, SIZES, 3, 5, 0, progress=False)
    across = run_protocol(es["LAB"], es["SEA"], ACROSS, SIZES, 3, 5, 0, progress=False)
    out = {f"LAB {c}": [100 * within.cell(c, n, 3).mean() for n in SIZES] for c in IN}
    return out | {f"LAB->SEA {c}": [100 * across.cell(c, n, 3).mean() for n in SIZES] for c in ACROSS}


def compare(name: str, model, cfg, data: Path) -> None:
    sets = load_sets(cfg, data)  # decoded once, embedded twice
    centred = accuracies(model, sets)
    norms = {m: float(b.norm()) for m, b in model.embed_center.named_buffers()}
    model.embed_center.reset()
    plain = accuracies(model, sets)
    print(f"\n{name}: center norms {', '.join(f'{m} {v:.3f}' for m, v in norms.items())}")
    print(
        f"  {'accuracy %, n = ' + '/'.join(map(str, SIZES)):<22} {'centred':>18} {'uncentred':>18} {'difference':>20}"
    )
    for key in centred:
        row = [" / ".join(f"{v:4.1f}" for v in vals) for vals in (centred[key], plain[key])]
        diff = " / ".join(f"{a - b:+4.1f}" for a, b in zip(centred[key], plain[key]))
        print(f"  {key:<22} {row[0]:>18} {row[1]:>18} {diff:>20}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="*", default=[], help="run folders or checkpoints")
    ap.add_argument("--data", type=Path, help="dataset with LAB and SEA (needed with --runs)")
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    if args.runs:
        if args.data is None:
            ap.error("--runs needs --data")
        for run in args.runs:
            state = load_checkpoint(resolve_checkpoint(run))
            compare(
                f"{run} (epoch {state['epoch']})", model_from_state(state, CPU), state["config"], args.data
            )
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        pool = demo_pool(data, n_sea=600)
        cfg = load_config(REPO / "configs" / "laptop.yaml", [f"optim.epochs={args.epochs}"])
        lab = load_labelled(str(data / "LAB"), cfg.data.image_size, cfg.data.profile_length)
        model = train(cfg, pool, lab, seed=0)[2]
        d = cfg.data
        sample = load_sample(
            str(data / "UTO"), d.image_size, d.profile_length, cfg.model.center_particles, d.seed
        )
        update_center(model, sample, CPU)
        compare(f"laptop config, {args.epochs} epochs in-process", model, cfg, data)


if __name__ == "__main__":
    main()
