"""An index on disk: a folder holding

    index.faiss   the FAISS index in CPU form (FAISS's own format: no pickle)
    ids.parquet   one row per index row, in FAISS id order: particle (ordinal), particle_id, label,
                  domain, modality ("image" | "profile")
    meta.json     how it was built: embeddings, checkpoint (and its SHA-256), kind, dim, count, index
                  type, parameters, recall@10 against exact search

Files are written under temporary names and renamed, so a crash never leaves a half index that
looks whole.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xmodal.eval.embeddings import Checkpoint

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
META_FILE = "meta.json"
FORMAT = "xmodal-index-1"

ID_SCHEMA = pa.schema(
    [
        pa.field("particle", pa.int64(), nullable=False),
        pa.field("particle_id", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("domain", pa.string()),
        pa.field("modality", pa.string(), nullable=False),
    ]
)


@dataclass
class IdMap:
    """Index row -> its particle. ``particle`` numbers particles 0..P-1 in build order (a fused
    index has up to two rows per particle); the other arrays are per row."""

    particle: np.ndarray  # int64
    particle_id: np.ndarray  # object
    label: np.ndarray  # object, None = unlabelled
    domain: np.ndarray  # object
    modality: np.ndarray  # object

    def __len__(self) -> int:
        return len(self.particle)

    @functools.cached_property
    def first_row(self) -> np.ndarray:
        """Particle code -> its first row (particle codes are 0..P-1)."""
        codes, first = np.unique(self.particle, return_index=True)
        out = np.full(int(codes.max()) + 1 if len(codes) else 0, -1, dtype=np.int64)
        out[codes] = first
        return out

    @staticmethod
    def from_table(table: pa.Table) -> IdMap:
        return IdMap(*(table.column(f.name).to_numpy(zero_copy_only=False) for f in ID_SCHEMA))

    def table(self) -> pa.Table:
        return pa.table(
            {f.name: pa.array(getattr(self, f.name), type=f.type) for f in ID_SCHEMA}, schema=ID_SCHEMA
        )


@dataclass
class StoredIndex:
    index: faiss.Index  # CPU form
    ids: IdMap
    meta: dict[str, Any]
    path: Path

    @property
    def kind(self) -> str:
        return str(self.meta["kind"])


def save_index(out: str | Path, index: faiss.Index, ids: pa.Table, meta: dict[str, Any]) -> Path:
    """Write the three files into ``out`` (created; earlier index files there are replaced)."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    if index.ntotal != ids.num_rows:
        raise ValueError(f"save_index: the index holds {index.ntotal} rows but the id map {ids.num_rows}")
    faiss.write_index(index, str(d / f"{INDEX_FILE}.tmp"))
    pq.write_table(ids.cast(ID_SCHEMA), d / f"{IDS_FILE}.tmp", compression="zstd")
    (d / f"{META_FILE}.tmp").write_text(json.dumps({"format": FORMAT, **meta}, indent=1))
    for name in (INDEX_FILE, IDS_FILE, META_FILE):  # meta last: its presence marks a complete index
        (d / f"{name}.tmp").replace(d / name)
    return d


def read_meta(path: str | Path) -> dict[str, Any]:
    f = Path(path) / META_FILE
    if not f.exists():
        raise FileNotFoundError(
            f"no {META_FILE} in {path}: not an index folder; build one with `xmodal index build`"
        )
    meta = json.loads(f.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{f}: format {meta.get('format')!r}, expected {FORMAT!r}; rebuild the index")
    return meta


def index_checkpoint(meta: dict[str, Any]) -> Checkpoint | None:
    """The checkpoint that embedded an index's rows, None when not recorded (older indexes)."""
    if not meta.get("checkpoint"):
        return None
    return Checkpoint(str(meta["checkpoint"]), str(meta.get("checkpoint_sha256") or ""))


def load_index(path: str | Path) -> StoredIndex:
    """Load an index folder; IVF indexes get a direct map so stored rows can be reconstructed."""
    d = Path(path)
    meta = read_meta(d)
    for name in (INDEX_FILE, IDS_FILE):
        if not (d / name).exists():
            raise FileNotFoundError(f"{d / name} is missing; rebuild the index with `xmodal index build`")
    index = faiss.read_index(str(d / INDEX_FILE))
    ids = IdMap.from_table(pq.read_table(d / IDS_FILE))
    if index.ntotal != len(ids) or index.ntotal != meta["count"]:
        raise ValueError(
            f"{d}: index holds {index.ntotal} rows, id map {len(ids)}, meta.json says {meta['count']}; "
            "the folder mixes files of different builds: rebuild it"
        )
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.make_direct_map()
    return StoredIndex(index=index, ids=ids, meta=meta, path=d)


def describe(path: str | Path) -> str:
    """A few lines about an index folder (``xmodal index info``), from its meta.json."""
    d = Path(path)
    meta = read_meta(d)
    size = sum(f.stat().st_size for f in d.iterdir() if f.name in (INDEX_FILE, IDS_FILE, META_FILE))
    lines = [
        f"index      {d}  ({size / 2**20:.1f} MiB)",
        f"type       {meta['index_type']}  ({meta['factory']})  params {json.dumps(meta['params'])}",
        f"rows       {meta['count']:,} {meta['kind']} rows of {meta['particles']:,} particles, dim {meta['dim']}",
        f"recall@10  {meta['recall_at_10']:.4f}"
        + (" (exact)" if meta["index_type"] == "flat" else f" on {meta['recall_holdout']} held-out rows"),
        f"built from {meta['embeddings']}",
        f"checkpoint {meta['checkpoint'] or '(not recorded)'}",
        f"build      {json.dumps(meta['build_seconds'])} s, faiss {meta['faiss_version']}, {meta['gpus']} GPU(s)",
    ]
    return "\n".join(lines)
