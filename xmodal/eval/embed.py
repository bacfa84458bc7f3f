"""Embedding particles with a trained model: in-process for small sets (validation) and as a Ray
Data actor pool for datasets and archives (``xmodal embed``): the model is loaded once per actor,
and output streams shard by shard so that archives of millions of particles fit in memory."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from xmodal.config import ConfigError
from xmodal.data.pipeline import COLUMNS, read_parquet, table_to_model_batch
from xmodal.data.schema import parquet_files
from xmodal.eval.embeddings import CHECKPOINT_KEY, MANIFEST, OLD_MANIFEST, EmbeddingSet, embedding_column
from xmodal.eval.progress import ProgressLog

MODEL_KEYS = ("image", "image_meta", "profile", "profile_mask", "profile_meta", "has_image", "has_profile")


@torch.no_grad()
def embed_arrays(
    module: torch.nn.Module, batch: dict[str, np.ndarray], device: torch.device, chunk: int = 256
) -> dict[str, np.ndarray | None]:
    """Model batch (numpy) -> {"image": (N, E) float32 | None, "profile": ...}, L2-normalised.
    Rows lacking a modality get NaN-free zeros there (their ``has_*`` flag says so)."""
    n = len(batch["has_image"])
    parts: dict[str, list[np.ndarray]] = {}
    use_bf16 = device.type == "cuda"
    for s in range(0, n, chunk):
        # Ray Data hands actors read-only views; torch wants writable memory (a copy of one chunk)
        t = {
            k: torch.as_tensor(np.require(batch[k][s : s + chunk], requirements="W")).to(device)
            for k in MODEL_KEYS
        }
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = module.embed(t)
        for key, v in out.items():
            if v is not None:
                parts.setdefault(key, []).append(v.float().cpu().numpy())
    return {m: (np.concatenate(parts[m]) if m in parts else None) for m in ("image", "profile")}


def embedding_set(batch: dict[str, Any], emb: dict[str, np.ndarray | None]) -> EmbeddingSet:
    n = len(batch["has_image"])
    return EmbeddingSet(
        particle_id=np.asarray(batch.get("particle_id", np.arange(n).astype(str)), dtype=object),
        label=np.asarray(batch["label"], dtype=object),
        domain=np.asarray(batch.get("domain", np.full(n, "")), dtype=object),
        image_emb=emb["image"],
        image_valid=np.asarray(batch["has_image"], bool) if emb["image"] is not None else np.zeros(n, bool),
        profile_emb=emb["profile"],
        profile_valid=np.asarray(batch["has_profile"], bool)
        if emb["profile"] is not None
        else np.zeros(n, bool),
    )


def model_from_state(state: dict[str, Any], device: torch.device) -> torch.nn.Module:
    from xmodal.models.build import build_model
    from xmodal.models.cpu_kernels import use_small_map_kernels

    # the checkpoint's weights replace the initial ones: model.pretrained_path, long gone perhaps, is not read
    module = build_model(state["config"], pretrained=False)
    module.load_state_dict(state["model"])
    use_small_map_kernels(module)  # same function and weights; faster kernels on CPU only
    module = module.to(device).eval()
    if device.type == "cpu":
        # oneDNN runs NHWC convolutions without NCHW's layout reorders around every layer: embedding
        # 1.26x (resnet10t, 32 px) to 1.43x (efficientnet_b0, 64 px) faster here, values equal to
        # ~1e-7 (bench/RESULTS.md, archive scale). Training runs NHWC too (train.channels_last).
        module = module.to(memory_format=torch.channels_last)
    return module


KEEP = ("particle_id", "label", "domain", "path")  # carried past the model into the output rows


def prepare_rows(
    table: pa.Table, image_size: int, profile_length: int, image_norm: str = "fixed"
) -> dict[str, np.ndarray]:
    """Ray Data map step: Parquet rows -> model arrays (decode, resize, profile normalisation) plus
    the id columns. With GPU actors it runs as CPU tasks on every CPU of the cluster while the
    actors (one per GPU) only run the model. Without a GPU, Ray Data fuses it into the model actor
    pool (both steps ask for one CPU): each CPU actor decodes its own batches, then embeds them,
    and only the Parquet reads run as separate tasks."""
    batch = table_to_model_batch(table, image_size, profile_length, image_norm=image_norm)
    out = {k: batch[k] for k in MODEL_KEYS}
    for c in KEEP:
        # Ray Data turns an all-null object column into floats on the way to the actor: ship the
        # strings with a null mask instead, so an unlabelled shard keeps null labels
        values = table.column(c).cast(pa.string())
        out[f"{c}_null"] = values.is_null().to_numpy(zero_copy_only=False)
        out[c] = values.fill_null("").to_numpy(zero_copy_only=False).astype(str)
    return out


class Embedder:
    """Ray Data actor: holds the model; ``prepare_rows`` arrays -> embedding rows (pyarrow), with
    the id columns and Ray Data's ``path`` (each row goes back to its input shard)."""

    def __init__(self, state_ref: Any, float16: bool = False, cpu_threads: int = 1):
        import ray

        state = ray.get(state_ref) if isinstance(state_ref, ray.ObjectRef) else state_ref
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            # Ray sets one thread per reserved CPU, but CPU model actors reserve about half the CPUs
            # (the rest reads Parquet) and would leave cores idle: each uses its share of all of them.
            # 2 cores: 383 vs 298 particles/s with 1 thread (bench/RESULTS.md, archive scale)
            torch.set_num_threads(cpu_threads)
        self.module = model_from_state(state, self.device)
        self.dtype = pa.float16() if float16 else pa.float32()

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["has_image"])
        emb = embed_arrays(self.module, batch, self.device)
        out = {c: pa.array(batch[c].astype(object), pa.string(), mask=batch[f"{c}_null"]) for c in KEEP}
        for m in ("image", "profile"):
            vecs, has = emb[m], np.asarray(batch[f"has_{m}"], bool)
            if vecs is None:  # the model has no encoder for this modality: every row null
                vecs, has = np.zeros((n, 0), np.float32), np.zeros(n, bool)
            out[f"{m}_emb"] = embedding_column(vecs, has, self.dtype)
        return pa.table(out)


SOURCE_KEY = b"xmodal.source"  # Parquet metadata beside CHECKPOINT_KEY: from which input shard (its resolved path)
SOURCE_STAMP_KEY = b"xmodal.source_stamp"  # ... and which version of it (rows and bytes)


class _Shard(NamedTuple):
    """One input shard to embed: where its output goes, its rows, and its stamp (see ``_stamp``)."""

    dest: Path
    rows: int
    stamp: str


def _stamp(rows: int, file: Path) -> str:
    """What a rerun compares to decide that an output is still that of its input: a shard that
    ingest rewrote under the same name has other rows or (same rows, other content) other bytes."""
    return f"{rows} rows, {file.stat().st_size} bytes"


def output_schema(float16: bool, checkpoint: str, source: str, stamp: str = "") -> pa.Schema:
    emb = pa.list_(pa.float16() if float16 else pa.float32())
    return pa.schema(
        [
            ("particle_id", pa.string()),
            ("label", pa.string()),
            ("domain", pa.string()),
            ("image_emb", emb),
            ("profile_emb", emb),
        ],
        metadata={
            CHECKPOINT_KEY: checkpoint.encode(),
            SOURCE_KEY: source.encode(),
            SOURCE_STAMP_KEY: stamp.encode(),
        },
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_apart(data: Path, out: Path) -> None:
    """Refuse an output folder inside the input (or the other way round): the next run, and
    training on that folder, would read the embeddings as particles."""
    d, o = data.resolve(), out.resolve()
    if o.is_relative_to(d) or d.is_relative_to(o):
        raise ConfigError(
            f"--out {out} and --data {data} overlap: embeddings written there would be read as "
            "particles by the next run; choose an --out outside --data"
        )


def _claim_output(out: Path, ckpt_file: Path, float16: bool, overwrite: bool) -> None:
    """Record which model fills ``out``; refuse to mix another model's embeddings into it (a
    manifest alone, of a run that wrote no shard, is replaced)."""
    manifest = {
        "checkpoint": str(ckpt_file.resolve()),
        "checkpoint_sha256": _sha256(ckpt_file),
        "float16": float16,
    }
    path, old_path = out / MANIFEST, out / OLD_MANIFEST
    if not path.exists() and old_path.exists():  # a folder written before the rename
        path = old_path
    if overwrite:
        for old in [*out.rglob("*.parquet"), *out.rglob("*.parquet.tmp"), path]:  # .tmp: old and hidden
            old.unlink(missing_ok=True)
    elif path.exists():
        before = json.loads(path.read_text())
        if (
            before.get("checkpoint_sha256") != manifest["checkpoint_sha256"]
            or before.get("float16") != float16
        ) and any(out.rglob("*.parquet")):
            raise FileExistsError(
                f"{out} holds embeddings of {before.get('checkpoint')} (float16={before.get('float16')}); "
                f"this run uses {manifest['checkpoint']} (float16={float16}). Use another --out, or --overwrite"
            )
    elif any(out.rglob("*.parquet")):
        raise FileExistsError(
            f"{out} holds Parquet files that `xmodal embed` did not write; use an empty --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.rglob("*.parquet.tmp"):  # a shard that an interrupted run had in flight
        stale.unlink()
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    old_path.unlink(missing_ok=True)  # written under the new name: the folder reads as a dataset


def _plan(files: list[Path], data: Path, out: Path) -> tuple[dict[str, _Shard], int, list[str]]:
    """The input shards to embed, keyed by resolved path: all but those whose output was made from
    the same version of the same file. Also: how many are done, and the changed ones' names. An
    output made from another input file means ``out`` holds another dataset: refused."""
    targets: dict[str, _Shard] = {}
    changed = []
    for f in files:
        source, rows = str(f.resolve()), pq.ParquetFile(f).metadata.num_rows
        shard = _Shard(out / (f.relative_to(data) if data.is_dir() else f.name), rows, _stamp(rows, f))
        if shard.dest.exists():
            done_file = pq.ParquetFile(shard.dest)  # one footer read gives its metadata and rows
            meta = done_file.schema_arrow.metadata or {}
            made_from = meta.get(SOURCE_KEY, b"").decode()
            if made_from != source:
                raise FileExistsError(
                    f"{shard.dest} holds the embeddings of {made_from or 'an unknown file'}, not of {source}: "
                    f"{out} belongs to another dataset (or the data moved). Use another --out, or --overwrite"
                )
            stamp = meta.get(SOURCE_STAMP_KEY)
            # outputs written before stamps existed: the same row count means done
            done = (
                done_file.metadata.num_rows == rows
                if stamp is None
                else stamp.decode() == shard.stamp
            )
            if done:
                continue
            changed.append(str(shard.dest.relative_to(out)))
        targets[source] = shard
    return targets, len(files) - len(targets), changed


def _actor_count(actors: int | None, use_gpu: bool, gpus: float, cpus: int) -> int:
    """Model actors: ``actors``, by default one per GPU, or half the CPUs without GPUs. Every
    actor reserves one GPU (and a CPU) or one CPU; with too few free the pipeline would wait
    forever, so GPU actors are capped at the GPUs and CPU actors at the CPUs less one, which the
    Parquet reads need."""
    if use_gpu:
        if gpus < 1:
            raise ConfigError("use_gpu=True but the Ray cluster has no GPU; leave use_gpu unset")
        most, what = int(gpus), f"the cluster's {int(gpus)} GPUs"
    elif cpus < 2:
        raise ConfigError(
            f"embedding on CPU needs a Ray cluster of at least 2 CPUs (a model actor and a Parquet reader); "
            f"this one has {cpus}. Start one with `ray start --head --num-cpus 2` and pass --address auto"
        )
    else:
        most, what = cpus - 1, f"{cpus - 1} of the cluster's {cpus} CPUs (one stays for reading Parquet)"
    if not actors:
        return most if use_gpu else max(1, cpus // 2)
    if actors > most:
        print(f"[xmodal] embed: {actors} model actors asked for; using {most}, as many as fit on {what}")
        return most
    return actors


class _ShardOutputs:
    """One output file per input shard, written as ``.<name>.tmp`` and renamed once all its rows are
    in: a finished name is always a complete shard, so a rerun can skip it, and a shard in flight
    (or left by an interrupted run) is hidden from Parquet dataset readers."""

    def __init__(self, targets: dict[str, _Shard], float16: bool, checkpoint: str):
        self.targets, self.float16, self.checkpoint = targets, float16, checkpoint
        self.open: dict[str, tuple[pq.ParquetWriter, Path]] = {}
        self.written: dict[str, int] = {}

    def write(self, source: str, table: pa.Table) -> None:
        dest, expected, stamp = self.targets[source]
        if source not in self.open:
            tmp = dest.with_name(f".{dest.name}.tmp")  # hidden: the folder still reads as a dataset
            tmp.parent.mkdir(parents=True, exist_ok=True)
            schema = output_schema(self.float16, self.checkpoint, source, stamp)
            self.open[source] = (pq.ParquetWriter(tmp, schema, compression="zstd"), tmp)
            self.written[source] = 0
        writer, tmp = self.open[source]
        if table.num_rows:
            writer.write_table(table.cast(writer.schema))
        self.written[source] += table.num_rows
        if self.written[source] > expected:
            raise RuntimeError(
                f"{source}: {self.written[source]} rows embedded but the shard holds {expected}"
            )
        if self.written[source] == expected:
            writer.close()
            tmp.replace(dest)
            del self.open[source]

    def unfinished(self) -> list[str]:
        return [s for s in self.targets if s in self.open or s not in self.written]


def _split_by_source(table: pa.Table) -> list[tuple[str, pa.Table]]:
    paths = table.column("path")
    rest = table.drop_columns(["path"])
    values = pc.unique(paths).to_pylist()
    if len(values) == 1:
        return [(values[0], rest)]
    return [(v, rest.filter(pc.equal(paths, v))) for v in values]


def embed(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    batch_size: int = 256,
    float16: bool = False,
    actors: int | None = None,
    use_gpu: bool | None = None,
    address: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Embed every particle of ``data`` (Parquet file or folder) with ``checkpoint`` into ``out``.

    Streams: input shard ``data/<rel>`` becomes ``out/<rel>``, written through Ray Data's actor
    pool with bounded memory (one model per actor, GPU actors when the cluster has GPUs; ``actors``
    is capped at what the cluster can run). A rerun skips shards whose output was made from the
    same version of the same input file (new shards of a growing archive, and shards rewritten
    since, are embedded; done ones are not); an interrupted run loses only the shards in flight.
    ``overwrite`` starts afresh. ``out`` may not lie inside ``data``.
    """
    import ray

    from xmodal.runtime import init_ray
    from xmodal.train.checkpoint import CKPT_FILE, load_checkpoint, resolve_checkpoint

    t0 = time.monotonic()
    ckpt_path = resolve_checkpoint(checkpoint)
    ckpt_file = ckpt_path / CKPT_FILE if ckpt_path.is_dir() else ckpt_path
    state = load_checkpoint(ckpt_path)
    root, out = Path(data), Path(out)
    _check_apart(root, out)
    files = parquet_files(root)
    _claim_output(out, ckpt_file, float16, overwrite)
    targets, skipped, changed = _plan(files, root, out)
    total = sum(t.rows for t in targets.values())
    if skipped:
        print(f"[xmodal] embed: {skipped} of {len(files)} shards already embedded in {out}; skipping them")
    if changed:
        print(
            f"[xmodal] embed: {len(changed)} shard(s) changed since they were embedded "
            f"(e.g. {changed[0]}); embedding them again"
        )
    shards = _ShardOutputs(targets, float16, str(ckpt_file.resolve()))
    for source, t in targets.items():
        if t.rows == 0:  # no rows will stream past for it: write its empty output now
            shards.write(source, output_schema(float16, "", source).empty_table())
    pending = [s for s, t in targets.items() if t.rows > 0]
    if pending:
        init_ray(address)
        gpus = ray.cluster_resources().get("GPU", 0)
        use_gpu = gpus > 0 if use_gpu is None else use_gpu
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n_actors = _actor_count(actors, use_gpu, gpus, cpus)
        ctx = ray.data.DataContext.get_current()
        keep_order = ctx.execution_options.preserve_order
        ctx.execution_options.preserve_order = True  # shards finish one after another: few open at once
        try:
            ds = read_parquet(pending, include_paths=True)
            ds = ds.select_columns([*COLUMNS, "label", "domain", "path"])
            ds = ds.map_batches(
                prepare_rows,
                batch_size=batch_size,
                batch_format="pyarrow",
                fn_kwargs={
                    "image_size": state["config"].data.image_size,
                    "profile_length": state["config"].data.profile_length,
                    "image_norm": state["config"].data.image_norm,
                },
            )
            ds = ds.map_batches(
                Embedder,
                fn_constructor_kwargs={
                    "state_ref": ray.put(state),
                    "float16": float16,
                    "cpu_threads": max(1, cpus // n_actors),
                },
                batch_size=batch_size,
                batch_format="numpy",
                concurrency=n_actors,
                num_gpus=1 if use_gpu else 0,
            )
            log = ProgressLog("embed", total)
            for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for source, part in _split_by_source(block):
                    shards.write(source, part)
                log.update(block.num_rows)
        finally:
            ctx.execution_options.preserve_order = keep_order
    left = shards.unfinished()
    if left:
        raise RuntimeError(
            f"embedding ended with {len(left)} shard(s) incomplete (e.g. {left[0]}); rerun to finish"
        )
    dt = time.monotonic() - t0
    print(
        f"[xmodal] embedded {total:,} particles in {len(targets)} shards from {ckpt_path} in {dt:.1f}s "
        f"({total / max(dt, 1e-9):,.0f}/s; {skipped} shards skipped) -> {out}"
    )
    return out
