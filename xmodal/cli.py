"""The ``xmodal`` command: parse arguments, load the config, call one library function.

Heavy imports (torch, ray) happen inside each command so ``xmodal --help`` answers instantly.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def _config(args: argparse.Namespace):
    from xmodal.config import load_config

    return load_config(args.config, args.set)


def cmd_synth(args: argparse.Namespace) -> int:
    from xmodal.data.synth import synthesize

    summary = synthesize(
        args.out,
        n_lab=args.lab,
        n_sea=args.sea,
        n_uto=args.uto,
        seed=args.seed,
        fmt=args.format,
        image_size=args.image_size,
        n_species=args.species,
        progress=True,
    )
    for domain, d in summary["domains"].items():
        kind = f"{len(d['classes'])} classes" if d["labelled"] else "unlabelled"
        print(f"[xmodal] {domain}: {d['particles']} particles ({kind})")
    print(f"[xmodal] synthetic {args.format} data -> {args.out} (summary: {args.out}/synth.json)")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from xmodal.data.ingest import ingest

    report = ingest(
        args.src,
        args.out,
        fmt=args.format,
        strict=args.strict,
        domain=args.domain,
        crop_header_px=args.crop_header,
        max_pixels=args.max_pixels,
        channel_map=args.channel_map,
        fill_missing=args.fill_missing,
    )
    print(report.summary())
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from xmodal.train.trainer import pretrain

    pretrain(_config(args), address=args.address, name=args.name)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from xmodal.eval.embed import embed

    embed(
        args.checkpoint,
        args.data,
        args.out,
        batch_size=args.batch_size,
        float16=args.float16,
        address=args.address,
    )
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from xmodal.eval.benchmark import benchmark

    benchmark(
        args.embeddings,
        args.out,
        combos=args.combos,
        gallery_sizes=args.n,
        k=args.k,
        repeats=args.repeats,
        seed=args.seed,
        query_embeddings=args.queries,
    )
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from xmodal.tune.runner import run_sweep

    result = run_sweep(
        args.space,
        args.trials,
        concurrent=args.concurrent,
        gpus_per_trial=args.gpus_per_trial,
        name=args.name,
        resume=args.resume,
        storage_path=args.storage_path,
        address=args.address,
        base_config=args.config,
        overrides=args.set,
    )
    print(result.summary())
    return 0 if result.best is not None else 1


def cmd_models(args: argparse.Namespace) -> int:
    from xmodal.models.summary import model_table

    rows = model_table(args.image_size, args.profile_length)
    keys = list(rows[0]) if rows else []
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(str(r[k]) for k in keys))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xmodal", description="Cross-modal plankton recognition on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        return sp

    def config_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="YAML config (default: laptop defaults)")
        sp.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set optim.lr=0.01 (repeatable)",
        )
        sp.add_argument("--address", help="Ray cluster address (auto, ray://...); default: local in-process")

    sp = add("synth", cmd_synth, "write a synthetic CytoSense-like dataset (LAB, SEA, UTO domains)")
    sp.add_argument("out")
    sp.add_argument("--lab", type=int, default=1200)
    sp.add_argument("--sea", type=int, default=600)
    sp.add_argument("--uto", type=int, default=4000)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--format", choices=["syke", "parquet"], default="syke")
    sp.add_argument("--image-size", type=int, default=64)
    sp.add_argument("--species", type=int, default=12, help="number of species (plus detritus)")

    sp = add("ingest", cmd_ingest, "read instrument exports (SYKE layout, CytoClus, cyz2json) into Parquet")
    sp.add_argument("src")
    sp.add_argument("out")
    sp.add_argument("--format", choices=["syke", "cytoclus", "cyz2json"], help="default: detected")
    sp.add_argument(
        "--strict", action="store_true", help="fail on the first bad particle instead of quarantining"
    )
    sp.add_argument("--domain", help="domain name for the particles (default: the folder name)")
    sp.add_argument(
        "--crop-header", type=int, default=0, help="crop this many px (scale bar) off the image top"
    )
    sp.add_argument("--max-pixels", type=int, default=4_000_000, help="quarantine images larger than this")
    sp.add_argument("--channel-map", help="YAML mapping extra instrument channel names to canonical ones")
    sp.add_argument(
        "--fill-missing", action="store_true", help="zero-fill missing channels (recorded in a mask)"
    )

    sp = add(
        "pretrain", cmd_pretrain, "pretrain image + profile encoders (or the DINO baseline) on Ray Train"
    )
    config_args(sp)
    sp.add_argument("--name", help="run name; re-running the same name resumes it")

    sp = add("embed", cmd_embed, "embed particles with a trained checkpoint (Ray Data actor pool)")
    sp.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder (best checkpoint)")
    sp.add_argument("--data", required=True, help="Parquet folder of particles")
    sp.add_argument("--out", required=True)
    sp.add_argument("--batch-size", type=int, default=256)
    sp.add_argument("--float16", action="store_true")
    sp.add_argument("--address")

    sp = add("benchmark", cmd_benchmark, "gallery k-NN protocol (the paper's) over embeddings")
    sp.add_argument(
        "--embeddings", nargs="+", required=True, help="embedding folder(s); NAME=PATH to label them"
    )
    sp.add_argument("--queries", help="query embeddings (split / cross-domain mode); default: single mode")
    sp.add_argument("--out", required=True)
    sp.add_argument("--combos", nargs="+", default=None, help="e.g. I-I P-P I+P-I+P (default: all 9)")
    sp.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    sp.add_argument("--k", type=int, default=3)
    sp.add_argument("--repeats", type=int, default=5)
    sp.add_argument("--seed", type=int, default=0)

    sp = add("tune", cmd_tune, "search encoders, losses and temperatures (Ray Tune + Optuna, ASHA)")
    config_args(sp)
    sp.add_argument("--space", required=True, help="search space YAML (see tune_spaces/)")
    sp.add_argument("--trials", type=int, help="trials in total (default: the space's trials:)")
    sp.add_argument("--concurrent", type=int, default=1, help="trials running at once")
    sp.add_argument("--gpus-per-trial", type=int, default=0, help="GPUs per trial (one per Ray Train worker)")
    sp.add_argument("--name", help="sweep name (default: the space file's name)")
    sp.add_argument("--resume", action="store_true", help="continue an interrupted sweep of this name")
    sp.add_argument("--storage-path", default="sweeps", help="folder holding the sweep folders")

    sp = add("models", cmd_models, "list registered encoders with parameters and FLOPs")
    sp.add_argument("--image-size", type=int, default=64)
    sp.add_argument("--profile-length", type=int, default=64)
    return p


def main(argv: list[str] | None = None) -> int:
    import os

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # User-facing errors (bad config, missing files, bad data) print one clear line;
        # anything else keeps its traceback. XMODAL_DEBUG=1 shows tracebacks for all.
        from xmodal.config import ConfigError
        from xmodal.data.quarantine import DataError

        if os.environ.get("XMODAL_DEBUG") or not isinstance(
            e, (ConfigError, DataError, FileNotFoundError, FileExistsError)
        ):
            raise
        print(f"xmodal {args.command}: error: {e}", file=sys.stderr)
        return 2
