"""Embedding options on vs off, same weights: the gallery k-NN protocol on LAB (single mode) and
LAB gallery -> SEA queries, k = 3, 5 repeats.

    python bench/bench_embed_options.py --option flip                                # trains in-process
    python bench/bench_embed_options.py --option center --runs RUN_DIR... --data DATA  # pretrained runs

``--option center``: embedding centring (xmodal/models/center.py), the center measured on the pool
against a zero center. ``--option flip``: flip averaging (xmodal/models/views.py) on against off,
each with its own center measured on the pool, as the training loop measures it.

Without ``--runs`` it synthesizes the demo's data (UTO 4000, LAB 1200, SEA 600), trains the laptop
config single-process (bench/bench_logit_scale.py's loop; ~3 min on 2 cores). ``DATA`` must hold
LAB, SEA and UTO folders (UTO: the pool the center is measured on).
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


def with_option(model, option: str, on: bool, sample: dict) -> str:
    """Set ``option`` on the model (the center measured on ``sample`` after it); a note for the table."""
    if option == "flip":
        model.embed_flip.enabled.fill_(1.0 if on else 0.0)
    norms = update_center(model, sample, CPU)
    if option == "center" and not on:
        model.embed_center.reset()
        return "zero center"
    return "center norms " + ", ".join(f"{k.removeprefix('center_norm_')} {v:.3f}" for k, v in norms.items())


def compare(name: str, model, cfg, data: Path, option: str) -> None:
    sets = load_sets(cfg, data)  # decoded once, embedded twice
    d = cfg.data
    sample = load_sample(
        str(data / "UTO"), d.image_size, d.profile_length, cfg.model.center_particles, d.seed
    )
    acc, notes = {}, {}
    for on in (True, False):
        notes[on] = with_option(model, option, on, sample)
        acc[on] = accuracies(model, sets)
    print(f"\n{name}: {option} on ({notes[True]}) vs off ({notes[False]})")
    print(f"  {'accuracy %, n = ' + '/'.join(map(str, SIZES)):<22} {'on':>18} {'off':>18} {'difference':>20}")
    for key in acc[True]:
        row = [" / ".join(f"{v:4.1f}" for v in acc[on][key]) for on in (True, False)]
        diff = " / ".join(f"{a - b:+4.1f}" for a, b in zip(acc[True][key], acc[False][key]))
        print(f"  {key:<22} {row[0]:>18} {row[1]:>18} {diff:>20}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="*", default=[], help="run folders or checkpoints")
    ap.add_argument("--data", type=Path, help="dataset with LAB and SEA (needed with --runs)")
    ap.add_argument("--option", choices=("center", "flip"), required=True)
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    if args.runs:
        if args.data is None:
            ap.error("--runs needs --data")
        for run in args.runs:
            state = load_checkpoint(resolve_checkpoint(run))
            model = model_from_state(state, CPU)
            compare(f"{run} (epoch {state['epoch']})", model, state["config"], args.data, args.option)
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        pool = demo_pool(data, n_sea=600)
        cfg = load_config(REPO / "configs" / "laptop.yaml", [f"optim.epochs={args.epochs}"])
        lab = load_labelled(str(data / "LAB"), cfg.data.image_size, cfg.data.profile_length)
        model = train(cfg, pool, lab, seed=0)[2]
        compare(f"laptop config, {args.epochs} epochs in-process", model, cfg, data, args.option)


if __name__ == "__main__":
    main()
