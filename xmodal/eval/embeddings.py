"""Embeddings of labelled / unlabelled particles, in memory (``EmbeddingSet``) and as Parquet.

One row per particle (docs/INTERFACES.md)::

    particle_id  string
    label        string, null = unlabelled
    domain       string
    image_emb    list<float32> (list<halffloat> when written with float16=True), null = no image
    profile_emb  list<float32> / list<halffloat>, null = no profile

A model with one modality (the DINO baseline) leaves the other column all-null; in memory that
modality then has width 0. Everything after embedding (k-NN, protocol, reports) starts from here.

Embeddings of different checkpoints live in different spaces: comparing them gives meaningless
neighbours of the right shape. ``xmodal embed`` records its checkpoint in every shard's Parquet
metadata (``CHECKPOINT_KEY``) and, with the file's SHA-256, in its manifest (``MANIFESTS``);
``embeddings_checkpoint`` reads it (refusing a folder whose shards disagree) and
``check_same_checkpoint`` is what every search of one set against another calls first.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from xmodal.data.quarantine import DataError
from xmodal.data.schema import UNLABELLED

MODALITIES = ("image", "profile")
# Written by `xmodal embed` (xmodal.eval.embed, which imports them from here)
CHECKPOINT_KEY = b"xmodal.checkpoint"  # Parquet metadata: the checkpoint file that made a shard
# In the output folder: {"checkpoint": path, "checkpoint_sha256": ...}. Its name starts with "_" so
# that Parquet dataset readers (pyarrow.dataset, pandas.read_parquet, Spark) skip it.
MANIFEST = "_embed.json"
OLD_MANIFEST = "embed.json"  # its name in older outputs: still read, renamed by the next embed run
MANIFESTS = (MANIFEST, OLD_MANIFEST)


@dataclass
class EmbeddingSet:
    """Per-particle embeddings. ``*_emb`` is (N, D) float32 (D = 0 when the modality is absent);
    rows where ``*_valid`` is False carry no embedding and are never searched."""

    particle_id: np.ndarray
    label: np.ndarray
    domain: np.ndarray
    image_emb: np.ndarray | None
    image_valid: np.ndarray
    profile_emb: np.ndarray | None
    profile_valid: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.particle_id)
        self.particle_id = np.asarray(self.particle_id, dtype=object)
        self.label = np.array(
            [
                None if (v is None or (isinstance(v, str) and v.strip().casefold() in UNLABELLED)) else str(v)
                for v in self.label
            ],
            dtype=object,
        )
        self.domain = np.asarray(self.domain, dtype=object)
        for name in ("label", "domain"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"EmbeddingSet: {name} has {len(getattr(self, name))} rows, particle_id has {n}"
                )
        for m in MODALITIES:
            emb = getattr(self, f"{m}_emb")
            emb = np.zeros((n, 0), np.float32) if emb is None else np.asarray(emb, dtype=np.float32)
            valid = np.asarray(getattr(self, f"{m}_valid"), dtype=bool)
            if emb.ndim != 2 or emb.shape[0] != n or valid.shape != (n,):
                raise ValueError(
                    f"EmbeddingSet: {m}_emb must be (N, D) and {m}_valid (N,) with N = {n}; "
                    f"got {emb.shape} and {valid.shape}"
                )
            if emb.shape[1] == 0 and valid.any():
                raise ValueError(
                    f"EmbeddingSet: {int(valid.sum())} rows have {m}_valid set but {m}_emb is empty"
                )
            bad = valid & ~np.isfinite(emb).all(axis=1)
            if bad.any():
                ids = ", ".join(map(str, self.particle_id[bad][:5]))
                raise DataError(
                    f"EmbeddingSet: {int(bad.sum())} {m} embeddings contain NaN/inf (particles {ids}); "
                    "the model produced non-finite outputs for them"
                )
            setattr(self, f"{m}_emb", emb)
            setattr(self, f"{m}_valid", valid)

    def __len__(self) -> int:
        return len(self.particle_id)

    @property
    def labelled(self) -> np.ndarray:
        return np.array([v is not None for v in self.label], dtype=bool)

    def emb(self, modality: str) -> np.ndarray:
        return getattr(self, f"{modality}_emb")

    def valid(self, modality: str) -> np.ndarray:
        return getattr(self, f"{modality}_valid")

    def subset(self, mask: np.ndarray | Sequence[int]) -> EmbeddingSet:
        """Rows selected by a boolean mask or an integer index array (in that order)."""
        sel = np.asarray(mask)
        if sel.dtype == bool and sel.shape != (len(self),):
            raise ValueError(f"subset: boolean mask has shape {sel.shape}, expected ({len(self)},)")
        return EmbeddingSet(
            particle_id=self.particle_id[sel],
            label=self.label[sel],
            domain=self.domain[sel],
            image_emb=self.image_emb[sel],
            image_valid=self.image_valid[sel],
            profile_emb=self.profile_emb[sel],
            profile_valid=self.profile_valid[sel],
        )

    @staticmethod
    def concat(sets: Sequence[EmbeddingSet]) -> EmbeddingSet:
        """Rows of all ``sets`` in order; a modality absent from some sets (width 0) is padded."""
        if not sets:
            raise ValueError("concat: no embedding sets given")
        embs: dict[str, np.ndarray] = {}
        for m in MODALITIES:
            dims = {s.emb(m).shape[1] for s in sets} - {0}
            if len(dims) > 1:
                raise ValueError(f"concat: {m} embeddings have different widths {sorted(dims)}")
            d = dims.pop() if dims else 0
            embs[m] = np.concatenate(
                [s.emb(m) if s.emb(m).shape[1] == d else np.zeros((len(s), d), np.float32) for s in sets]
            )
        return EmbeddingSet(
            particle_id=np.concatenate([s.particle_id for s in sets]),
            label=np.concatenate([s.label for s in sets]),
            domain=np.concatenate([s.domain for s in sets]),
            image_emb=embs["image"],
            image_valid=np.concatenate([s.image_valid for s in sets]),
            profile_emb=embs["profile"],
            profile_valid=np.concatenate([s.profile_valid for s in sets]),
        )


def embedding_column(emb: np.ndarray, valid: np.ndarray, dtype: pa.DataType) -> pa.Array:
    n, d = emb.shape
    values = pa.array(emb[valid].reshape(-1).astype(dtype.to_pandas_dtype()), type=dtype)
    offsets = np.zeros(n + 1, dtype=np.int32)
    offsets[1:] = np.cumsum(np.where(valid, d, 0))
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(~valid))


def embeddings_table(es: EmbeddingSet, float16: bool = False) -> pa.Table:
    dtype = pa.float16() if float16 else pa.float32()
    return pa.table(
        {
            "particle_id": pa.array(es.particle_id.tolist(), type=pa.string()),
            "label": pa.array(es.label.tolist(), type=pa.string()),
            "domain": pa.array(es.domain.tolist(), type=pa.string()),
            "image_emb": embedding_column(es.image_emb, es.image_valid, dtype),
            "profile_emb": embedding_column(es.profile_emb, es.profile_valid, dtype),
        }
    )


def write_embeddings(
    es: EmbeddingSet, out_dir: str | Path, float16: bool = False, checkpoint: str = ""
) -> Path:
    """Write ``es`` as a new shard ``out_dir/part-NNNNN.parquet`` (the next free number), so
    repeated calls, also from concurrent writers, append shards; ``checkpoint`` (the file that
    made them) is recorded as `xmodal embed` records it. Returns the shard path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = embeddings_table(es, float16)
    if checkpoint:
        table = table.replace_schema_metadata({CHECKPOINT_KEY: checkpoint.encode()})
    taken = [int(p.stem.split("-")[1]) for p in out.glob("part-*.parquet") if p.stem.split("-")[1].isdigit()]
    number = max(taken, default=-1) + 1
    while True:
        path = out / f"part-{number:05d}.parquet"
        try:
            with open(path, "xb") as f:  # exclusive create: a concurrent writer takes the next number
                pq.write_table(table, f, compression="zstd")
            return path
        except FileExistsError:
            number += 1


def _embedding_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"no embedding Parquet files at {path}; run `xmodal embed --out {path}` first"
        )
    return files


def _matrix(table: pa.Table, column: str, where: Path) -> tuple[np.ndarray, np.ndarray]:
    n = table.num_rows
    if column not in table.column_names:
        return np.zeros((n, 0), np.float32), np.zeros(n, bool)
    arr = table.column(column).combine_chunks()
    if pa.types.is_null(arr.type):
        return np.zeros((n, 0), np.float32), np.zeros(n, bool)
    if not (
        pa.types.is_list(arr.type)
        or pa.types.is_large_list(arr.type)
        or pa.types.is_fixed_size_list(arr.type)
    ):
        raise DataError(f"{where}: column {column} has type {arr.type}, expected list<float32>")
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    if not valid.any():
        return np.zeros((n, 0), np.float32), valid
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False)
    dims = np.unique(lengths[valid])
    if len(dims) > 1 or (len(dims) == 1 and dims[0] == 0):
        ids = table.column("particle_id").to_numpy(zero_copy_only=False)
        odd = valid & (lengths != (dims.max() if len(dims) else 0))
        raise DataError(
            f"{where}: {column} lengths differ between rows ({dims.tolist()}), e.g. particle "
            f"{ids[odd][0] if odd.any() else ids[valid][0]}; every embedding of a column must have one width"
        )
    d = int(dims[0]) if len(dims) else 0
    flat = pc.list_flatten(arr)
    if flat.null_count:
        raise DataError(f"{where}: {column} contains null values inside embeddings")
    out = np.zeros((n, d), np.float32)
    out[valid] = flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d)
    return out, valid


def _check_columns(names: Sequence[str], path: Path, root: Path) -> None:
    """An embeddings shard has the id columns and at least one embedding column. Particles (what
    ingest writes, with ``image``/``profile``) have the id columns too, so they are named as such."""
    if "image_emb" not in names and "profile_emb" not in names:
        if "image" in names or "profile" in names:
            raise DataError(
                f"{root} holds particles, not embeddings: run `xmodal embed --checkpoint RUN "
                f"--data {root} --out OUT` first and pass OUT"
            )
        raise DataError(f"{path}: no image_emb or profile_emb column; is this an `xmodal embed` output?")
    missing = [c for c in ("particle_id", "label", "domain") if c not in names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; is this an `xmodal embed` output?")


def _read_file(path: Path, root: Path | None = None) -> EmbeddingSet:
    table = pq.read_table(path)
    _check_columns(table.column_names, path, root or path)
    image, image_valid = _matrix(table, "image_emb", path)
    profile, profile_valid = _matrix(table, "profile_emb", path)
    return EmbeddingSet(
        particle_id=table.column("particle_id").to_numpy(zero_copy_only=False),
        label=table.column("label").to_numpy(zero_copy_only=False),
        domain=table.column("domain").to_numpy(zero_copy_only=False),
        image_emb=image,
        image_valid=image_valid,
        profile_emb=profile,
        profile_valid=profile_valid,
    )


def load_embeddings(path: str | Path) -> EmbeddingSet:
    """One Parquet file or every ``*.parquet`` under a folder (sorted), as float32. Duplicate
    particle ids are an error: a particle in the gallery twice would be its own exact match; so
    are particles (not embeddings) and shards embedded by different checkpoints."""
    root = Path(path)
    embeddings_checkpoint(root)  # a particle folder, or shards of several models, are refused here
    es = EmbeddingSet.concat([_read_file(f, root) for f in _embedding_files(root)])
    ids, counts = np.unique(es.particle_id.astype(str), return_counts=True)
    if (counts > 1).any():
        dup = ids[counts > 1]
        raise DataError(
            f"{root}: {len(dup)} particle ids occur more than once (e.g. {', '.join(dup[:3])}); "
            "remove the duplicate shard or re-run `xmodal embed` into an empty folder"
        )
    return es


@dataclass(frozen=True)
class Checkpoint:
    """The checkpoint that embedded a set: the file `xmodal embed` recorded and, when its
    manifest (``MANIFESTS``) (or an index's meta.json) is there, the file's SHA-256, which identifies the
    model also when the run folder was copied or mounted elsewhere."""

    path: str
    sha256: str = ""

    def same_as(self, other: Checkpoint) -> bool | None:
        """Both hashes known: they decide. Else the same path is the same file; different paths
        where only one side records a hash (e.g. an index built before hashes were recorded, run
        folder moved since): None, it cannot tell. Neither records one: different paths differ."""
        if self.sha256 and other.sha256:
            return self.sha256 == other.sha256
        if self.path == other.path:
            return True
        return None if self.sha256 or other.sha256 else False


def embeddings_checkpoint(path: str | Path) -> Checkpoint | None:
    """The checkpoint recorded for the embeddings at ``path`` (a shard or a folder), None when
    none is (outputs of older versions, or of other writers). Reads only the shards' schemas;
    refuses a particle folder and a folder whose shards were embedded by different checkpoints
    (e.g. two `xmodal embed` outputs under one parent, read as one set)."""
    root = Path(path)
    seen: dict[str, Path] = {}  # checkpoint -> first shard recording it
    for f in _embedding_files(root):
        schema = pq.read_schema(f)
        _check_columns(schema.names, f, root)
        recorded = (schema.metadata or {}).get(CHECKPOINT_KEY, b"").decode()
        if recorded:  # an empty input shard's output records none
            seen.setdefault(recorded, f)
    if len(seen) > 1:
        (a, fa), (b, fb) = list(seen.items())[:2]
        raise DataError(
            f"{root} mixes embeddings of {len(seen)} checkpoints ({fa} from {a}, {fb} from {b}); "
            "one set must come from one model: pass a single `xmodal embed --out` folder, or embed "
            "into an empty folder with one checkpoint"
        )
    # a shard file: its folder's manifest, used only when it names the shard's checkpoint (below)
    folder = root if root.is_dir() else root.parent
    manifest = next((folder / m for m in MANIFESTS if (folder / m).is_file()), None)
    info = json.loads(manifest.read_text()) if manifest else {}
    if not seen and folder != root:
        return None  # a file recording none: its folder's manifest may speak of other shards
    if not seen:
        # no shard records one: outputs of older versions, where the manifest may still say
        return (
            Checkpoint(info["checkpoint"], info.get("checkpoint_sha256", ""))
            if info.get("checkpoint")
            else None
        )
    recorded = next(iter(seen))
    # the hash only when the manifest speaks of the same file as the shards
    return Checkpoint(
        recorded, info.get("checkpoint_sha256", "") if info.get("checkpoint") == recorded else ""
    )


def check_same_checkpoint(
    first: str | Path, first_ckpt: Checkpoint | None, second: str | Path, second_ckpt: Checkpoint | None
) -> None:
    """Refuse to search one set of embeddings (or an index) with another made by a different
    checkpoint: their vectors are not comparable, yet every search would run and return neighbours.
    Sets without a recorded checkpoint (older outputs) pass; where only one side records the
    checkpoint's hash and the paths differ, it cannot tell: a warning on stderr, no error."""
    if first_ckpt is None or second_ckpt is None:
        return
    same = first_ckpt.same_as(second_ckpt)
    if same:
        return
    if same is None:
        print(
            f"warning: cannot tell whether {first} (checkpoint {first_ckpt.path}) and {second} (checkpoint "
            f"{second_ckpt.path}) were embedded by the same model: only one records the checkpoint's "
            "SHA-256; make sure they were, or re-embed both with one checkpoint",
            file=sys.stderr,
        )
        return
    raise DataError(
        f"{first} holds embeddings of checkpoint {first_ckpt.path} but {second} of {second_ckpt.path}; "
        "embeddings of different checkpoints are not comparable: embed both with the same checkpoint "
        "(`xmodal embed --checkpoint RUN`)"
    )
