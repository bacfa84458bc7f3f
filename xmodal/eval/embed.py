"""Embedding particles with a trained model: in-process for small sets (validation) and as a Ray
Data actor pool for datasets (``xmodal embed``): the model is loaded once per actor."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from xmodal.data.pipeline import COLUMNS
from xmodal.data.schema import parquet_files
from xmodal.data.transforms import to_model_batch
from xmodal.eval.embeddings import EmbeddingSet

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
        t = {k: torch.as_tensor(batch[k][s : s + chunk]).to(device) for k in MODEL_KEYS}
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

    module = build_model(state["config"])
    module.load_state_dict(state["model"])
    return module.to(device).eval()


class Embedder:
    """Ray Data actor: holds the model; Parquet rows (pyarrow) -> embedding rows (pyarrow)."""

    def __init__(self, state_ref: Any, float16: bool = False):
        import ray

        state = ray.get(state_ref) if isinstance(state_ref, ray.ObjectRef) else state_ref
        self.cfg = state["config"]
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.module = model_from_state(state, self.device)
        self.dtype = pa.float16() if float16 else pa.float32()

    def __call__(self, table: pa.Table) -> pa.Table:
        cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in COLUMNS if c != "profile"}
        cols["profile"] = table.column("profile").to_pylist()
        batch = to_model_batch(cols, self.cfg.data.image_size, self.cfg.data.profile_length)
        emb = embed_arrays(self.module, batch, self.device)
        out = {
            "particle_id": table.column("particle_id"),
            "label": table.column("label"),
            "domain": table.column("domain"),
        }
        for m, has in (("image", batch["has_image"]), ("profile", batch["has_profile"])):
            vecs = emb[m]
            values = (
                None if vecs is None else [v if h else None for v, h in zip(vecs.astype(np.float32), has)]
            )
            out[f"{m}_emb"] = pa.array(
                values if values is not None else [None] * table.num_rows, type=pa.list_(self.dtype)
            )
        return pa.table(out)


def embed(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    batch_size: int = 256,
    float16: bool = False,
    actors: int | None = None,
    use_gpu: bool | None = None,
    address: str | None = None,
) -> Path:
    """Embed every particle of ``data`` (Parquet folder) with ``checkpoint`` into ``out`` (Parquet)."""
    import ray

    from xmodal.runtime import init_ray
    from xmodal.train.checkpoint import load_checkpoint, resolve_checkpoint

    ckpt_path = resolve_checkpoint(checkpoint)
    state = load_checkpoint(ckpt_path)
    files = [str(f) for f in parquet_files(data)]
    init_ray(address)
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = gpus > 0 if use_gpu is None else use_gpu
    n_actors = actors or (int(gpus) if use_gpu else max(1, int(ray.cluster_resources().get("CPU", 1)) // 2))
    t0 = time.time()
    ds = ray.data.read_parquet(files, columns=COLUMNS + ["label", "domain"])
    ds = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"state_ref": ray.put(state), "float16": float16},
        batch_size=batch_size,
        batch_format="pyarrow",
        concurrency=n_actors,
        num_gpus=1 if use_gpu else 0,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.parquet"):
        old.unlink()
    ds.write_parquet(str(out.resolve()))
    n = sum(pq.ParquetFile(f).metadata.num_rows for f in out.glob("*.parquet"))
    dt = time.time() - t0
    print(
        f"[xmodal] embedded {n} particles from {ckpt_path} in {dt:.1f}s ({n / max(dt, 1e-9):.0f}/s) -> {out}"
    )
    return out
