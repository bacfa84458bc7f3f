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
        **({} if args.header_px is None else {"header_px": args.header_px}),
    )
    for domain, d in summary["domains"].items():
        kind = f"{len(d['classes'])} classes" if d["labelled"] else "unlabelled"
        print(f"[xmodal] {domain}: {d['particles']} particles ({kind})")
    print(f"[xmodal] synthetic {args.format} data -> {args.out} (summary: {args.out}/synth.json)")
    return 0


def _whole_number(text: str, low: int, expected: str) -> int:
    """An argparse value: an integer >= ``low``; ``expected`` says what the option takes."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {expected} >= {low}, got {value}")
    return value


def _header_rows(text: str) -> int | None:
    return None if text == "auto" else _whole_number(text, 0, "auto or a number of rows")


def _positive_int(text: str) -> int:
    return _whole_number(text, 1, "a number")


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
        actors=args.actors,
        address=args.address,
        overwrite=args.overwrite,
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
        gallery_domain=args.gallery_domain,
        query_domain=args.query_domain,
        folds=args.folds,
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


def cmd_index(args: argparse.Namespace) -> int:
    if args.action == "info":
        from xmodal.index.store import describe

        print(describe(args.index))
        return 0
    use_gpu = False if args.no_gpu else None
    if args.action == "build":
        from xmodal.index.build import BuildOptions, build_index

        options = BuildOptions(
            kind=args.kind,
            exact_max=args.exact_max,
            approx=args.approx,
            nlist=args.nlist,
            pq_m=args.pq_m,
            hnsw_m=args.hnsw_m,
            holdout=args.holdout,
            target_recall=args.target_recall,
            seed=args.seed,
            use_gpu=use_gpu,
        )
        build_index(args.embeddings, args.out, options)
        return 0
    from xmodal.config import ConfigError
    from xmodal.index.search import check_out, search_embeddings, search_ids, write_results

    if bool(args.ids) == bool(args.embeddings):
        raise ConfigError(
            "xmodal index search: give either --ids (stored particles) or --embeddings (new ones)"
        )
    check_out(args.out)
    frames = (
        [search_ids(args.index, args.ids, args.k, use_gpu)]
        if args.ids
        else search_embeddings(args.index, args.embeddings, args.k, args.query_kind, use_gpu)
    )
    lines = write_results(frames, args.out)
    if args.out:
        print(f"[xmodal] {lines:,} neighbour lines -> {args.out}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from xmodal.index.classify import classify

    classify(
        args.gallery,
        args.queries,
        args.out,
        k=args.k,
        kind=args.kind,
        query_kind=args.query_kind,
        threshold=args.threshold,
        accept=args.accept,
        volume_ml=args.volume_ml,
        html=args.html,
        particles=args.particles,
        gallery_particles=args.gallery_particles,
        use_gpu=False if args.no_gpu else None,
    )
    return 0


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
            action="extend",
            nargs="+",
            default=[],
            metavar="KEY=VALUE",
            help="override config values, e.g. --set optim.lr=0.01 optim.epochs=2 (repeatable)",
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
    sp.add_argument(
        "--header-px", type=int, default=None,
        help="rows of scale-bar band drawn on top of every SYKE-layout crop (default: 25, as in the SYKE "
        "dataset; 0: none)",
    )  # fmt: skip

    sp = add("ingest", cmd_ingest, "read instrument exports (SYKE layout, CytoClus, cyz2json) into Parquet")
    sp.add_argument("src")
    sp.add_argument("out")
    sp.add_argument("--format", choices=["syke", "cytoclus", "cyz2json"], help="default: detected")
    sp.add_argument(
        "--strict", action="store_true", help="fail on the first bad particle instead of quarantining"
    )
    sp.add_argument("--domain", help="domain name for the particles (default: the folder name)")
    sp.add_argument(
        "--crop-header",
        type=_header_rows,
        default=None,
        metavar="auto|N",
        help="rows (a scale-bar header) cut off the top of every image: auto (default) finds a header drawn "
        "into every crop of a SYKE-layout source, N cuts N, 0 keeps every image whole",
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
    sp.add_argument("--float16", action="store_true", help="store embeddings as float16 (half the size)")
    sp.add_argument(
        "--actors",
        type=_positive_int,
        help="model actors (default: one per GPU, or half the CPUs); capped at what the cluster can run",
    )
    sp.add_argument(
        "--overwrite", action="store_true", help="delete the embeddings already in --out and start afresh"
    )
    sp.add_argument("--address")

    sp = add("benchmark", cmd_benchmark, "gallery k-NN protocol (the paper's) over embeddings")
    sp.add_argument(
        "--embeddings", nargs="+", required=True, help="embedding folder(s); NAME=PATH to label them"
    )
    sp.add_argument(
        "--queries",
        nargs="+",
        help="query embeddings, one per model in --embeddings order or NAME=PATH (split / "
        "cross-domain mode, e.g. gallery LAB, queries SEA); default: single mode",
    )
    sp.add_argument("--gallery-domain", help="use only gallery particles of this domain")
    sp.add_argument("--query-domain", help="use only query particles of this domain")
    sp.add_argument("--folds", type=int, help="stratified k-fold split mode (the paper uses 5 on LAB)")
    sp.add_argument("--out", required=True)
    sp.add_argument("--combos", nargs="+", default=None, help="e.g. I-I P-P I+P-I+P (default: all 9)")
    sp.add_argument("--n", type=_positive_int, nargs="+", default=[1, 2, 4, 8, 16])
    sp.add_argument("--k", type=_positive_int, nargs="+", default=[3])
    sp.add_argument("--repeats", type=_positive_int, default=5)
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

    kinds = ["fused", "image", "profile"]
    ip = add("index", cmd_index, "FAISS index over embeddings: build, search, info")
    isub = ip.add_subparsers(dest="action", required=True)
    sp = isub.add_parser("build", help="build an exact or approximate (IVF/HNSW) index; records recall@10")
    sp.add_argument("--embeddings", required=True, help="embeddings folder (from `xmodal embed`)")
    sp.add_argument("--out", required=True, help="index folder to write")
    sp.add_argument("--kind", choices=kinds, default="fused", help="fused = both embeddings of each particle")
    sp.add_argument("--exact-max", type=int, default=200_000, help="rows up to which the index is exact")
    sp.add_argument("--approx", choices=["ivf-flat", "ivf-pq", "hnsw"], default="ivf-flat")
    sp.add_argument("--nlist", type=int, default=0, help="IVF lists (0: 4 sqrt(rows))")
    sp.add_argument("--pq-m", type=int, default=0, help="IVF-PQ bytes per vector (0: dim / 2)")
    sp.add_argument("--hnsw-m", type=int, default=32)
    sp.add_argument("--holdout", type=int, default=1000, help="held-out rows for recall@10")
    sp.add_argument("--target-recall", type=float, default=0.97)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--no-gpu", action="store_true", help="stay on CPU even when faiss sees a GPU")
    sp = isub.add_parser("search", help="top-k neighbours of stored particles (--ids) or new ones")
    sp.add_argument("--index", required=True)
    sp.add_argument("--ids", nargs="+", help="particle ids stored in the index")
    sp.add_argument("--embeddings", help="embeddings of new particles")
    sp.add_argument("--query-kind", choices=kinds, help="default: the index's kind")
    sp.add_argument("--k", type=int, default=10)
    sp.add_argument("--out", help=".csv or .parquet (default: print the first lines)")
    sp.add_argument("--no-gpu", action="store_true")
    sp = isub.add_parser("info", help="what an index folder holds")
    sp.add_argument("--index", required=True)

    sp = add(
        "classify", cmd_classify, "classify new particles against a labelled gallery, with open-set rejection"
    )
    sp.add_argument("--gallery", required=True, help="labelled embeddings folder, or an index built from one")
    sp.add_argument("--queries", required=True, help="embeddings of the particles to classify")
    sp.add_argument("--out", required=True)
    sp.add_argument("--k", type=int, default=3)
    sp.add_argument("--kind", choices=kinds, default="fused", help="gallery kind (an index knows its own)")
    sp.add_argument("--query-kind", choices=kinds, help="default: the gallery's kind")
    sp.add_argument("--threshold", type=float, help="open-set score threshold (default: calibrated)")
    sp.add_argument(
        "--accept",
        type=float,
        default=0.95,
        help="calibrate the threshold to accept this share of the gallery (leave-one-out)",
    )
    sp.add_argument("--volume-ml", type=float, help="sample volume, for counts per mL")
    sp.add_argument("--html", action="store_true", help="write a contact sheet of sample particles")
    sp.add_argument("--particles", help="the queries' particle Parquet (images for --html)")
    sp.add_argument("--gallery-particles", help="the gallery's particle Parquet (images for --html)")
    sp.add_argument("--no-gpu", action="store_true")

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
