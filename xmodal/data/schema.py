"""The paired-particle record and its Parquet form: one row per particle.

Every reader (SYKE layout, CytoClus export, cyz2json) and the synthetic generator produce these
rows, so everything downstream reads one format. Columns (documented in the README):

    particle_id   string   unique within a dataset, e.g. "<source>:<id>"
    source        string   the file / export the particle came from
    domain        string   e.g. LAB, SEA, UTO, or the export name
    label         string   class name, null when unlabelled
    has_image     bool
    image         binary   encoded image bytes as stored by the instrument (JPEG/PNG), null if none
    image_height  int32    original height in px (after any scale-bar header crop), 0 if no image
    image_width   int32    original width in px, 0 if no image
    has_profile   bool
    profile       list<float32>  pulse shapes, channel-major: values[c * L + t], CHANNELS order, mV
    profile_length int32   L, samples per channel (0 if no profile)
    channel_mask  list<bool> one per channel in CHANNELS: False = channel absent, zero-filled

Profiles are stored in canonical channel order (see ``channels.py`` for the name mapping); the
canonical names are also written into the Parquet file metadata (``xmodal.channels``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CHANNELS: tuple[str, ...] = ("FWS", "SWS", "FL Yellow", "FL Orange", "FL Red", "Curvature")
N_CHANNELS = len(CHANNELS)
SATURATION_MV = 7488.0
LOG_NORM = math.log1p(SATURATION_MV)  # 8.9211..., the paper's normaliser
UM_PER_SAMPLE = 0.55  # particle travel per profile sample
SCHEMA_VERSION = "1"
# label values that mean "no class" wherever labels are read (compared stripped, case-folded)
UNLABELLED = frozenset({"", "unlabelled", "unlabeled"})

SCHEMA = pa.schema(
    [
        pa.field("particle_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("has_image", pa.bool_(), nullable=False),
        pa.field("image", pa.binary()),
        pa.field("image_height", pa.int32(), nullable=False),
        pa.field("image_width", pa.int32(), nullable=False),
        pa.field("has_profile", pa.bool_(), nullable=False),
        pa.field("profile", pa.list_(pa.float32())),
        pa.field("profile_length", pa.int32(), nullable=False),
        pa.field("channel_mask", pa.list_(pa.bool_())),
    ],
    metadata={"xmodal.channels": json.dumps(list(CHANNELS)), "xmodal.schema_version": SCHEMA_VERSION},
)


def make_record(
    particle_id: str,
    source: str,
    domain: str,
    label: str | None,
    image: bytes | None,
    image_hw: tuple[int, int] | None,
    profile: np.ndarray | None,
    channel_mask: Iterable[bool] | None = None,
) -> dict[str, Any]:
    """Build one row. ``profile`` is (N_CHANNELS, L) in mV, canonical channel order."""
    rec: dict[str, Any] = {
        "particle_id": str(particle_id),
        "source": source,
        "domain": domain,
        "label": label,
        "has_image": image is not None,
        "image": image,
        "image_height": int(image_hw[0]) if image is not None and image_hw else 0,
        "image_width": int(image_hw[1]) if image is not None and image_hw else 0,
        "has_profile": profile is not None,
        "profile": None,
        "profile_length": 0,
        "channel_mask": list(channel_mask) if channel_mask is not None else [True] * N_CHANNELS,
    }
    if profile is not None:
        p = np.asarray(profile, dtype=np.float32)
        if p.ndim != 2 or p.shape[0] != N_CHANNELS:
            raise ValueError(f"particle {particle_id}: profile must be ({N_CHANNELS}, L), got {p.shape}")
        rec["profile"] = p.reshape(-1)
        rec["profile_length"] = int(p.shape[1])
    return rec


def records_to_table(records: list[dict[str, Any]]) -> pa.Table:
    cols = {name: [r[name] for r in records] for name in SCHEMA.names}
    return pa.Table.from_pydict(cols, schema=SCHEMA)


def profile_matrix(row_profile: Any, length: int) -> np.ndarray:
    """Row's flat profile -> (N_CHANNELS, L) float32."""
    return np.asarray(row_profile, dtype=np.float32).reshape(N_CHANNELS, length)


class ShardWriter:
    """Writes rows into size-bounded Parquet shards ``part-00000.parquet``, ``part-00001...``.

    Rows are buffered and flushed as row groups; a shard is closed once its bytes exceed
    ``max_shard_bytes`` so that Ray Data can read shards in parallel and no file grows unbounded.
    """

    def __init__(
        self,
        out_dir: str | Path,
        max_shard_bytes: int = 128 * 2**20,
        rows_per_group: int = 2048,
        prefix: str = "part",
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.rows_per_group = rows_per_group
        self.prefix = prefix
        self._buf: list[dict[str, Any]] = []
        self._writer: pq.ParquetWriter | None = None
        self._path: Path | None = None
        self._shard = 0
        self.rows = 0
        self.paths: list[Path] = []

    def write(self, record: dict[str, Any]) -> None:
        self._buf.append(record)
        if len(self._buf) >= self.rows_per_group:
            self._flush()

    def write_table(self, table: pa.Table) -> None:
        self._flush()
        self._write_group(table.cast(SCHEMA))

    def _write_group(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if self._writer is None:
            self._path = self.out_dir / f"{self.prefix}-{self._shard:05d}.parquet"
            # dictionary-encoding the per-particle blobs costs time and saves nothing
            self._writer = pq.ParquetWriter(
                self._path, SCHEMA, compression="zstd", use_dictionary=["source", "domain", "label"]
            )
            self.paths.append(self._path)
        self._writer.write_table(table, row_group_size=self.rows_per_group)
        self.rows += table.num_rows
        if self._path is not None and self._path.stat().st_size >= self.max_shard_bytes:
            self._close_shard()

    def _flush(self) -> None:
        if self._buf:
            table = records_to_table(self._buf)
            self._buf = []
            self._write_group(table)

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._shard += 1

    def close(self) -> list[Path]:
        self._flush()
        self._close_shard()
        return self.paths

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def parquet_files(path: str | Path) -> list[Path]:
    """The Parquet files of a dataset folder (sorted), or the file itself."""
    p = Path(path)
    if p.is_file():
        return [p]
    files = sorted(p.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet files under {p}; run `xmodal ingest` or `xmodal synth` first")
    return files


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in parquet_files(path)])


def sample_table(
    path: str | Path, columns: list[str] | None, max_rows: int, seed: int = 0, max_groups: int = 8
) -> pa.Table:
    """Up to ``max_rows`` rows drawn at random (seeded) from up to ``max_groups`` row groups picked
    at random across the dataset's files: Parquet reads whole row groups, so this bounds the read
    however large the dataset is, and spreads the sample over it."""
    if max_rows < 1:
        raise ValueError(f"sample_table: max_rows must be >= 1, got {max_rows}")
    rng = np.random.default_rng(seed)
    groups = []
    for f in parquet_files(path):
        meta = pq.ParquetFile(f).metadata
        groups += [(f, i) for i in range(meta.num_row_groups) if meta.row_group(i).num_rows]
    if not groups:
        raise ValueError(f"sample_table: {path} holds no rows")
    picked = sorted(rng.permutation(len(groups))[:max_groups])
    table = pa.concat_tables(
        [pq.ParquetFile(groups[j][0]).read_row_group(groups[j][1], columns=columns) for j in picked]
    )
    if table.num_rows > max_rows:
        table = table.take(np.sort(rng.choice(table.num_rows, max_rows, replace=False)))
    return table


def iter_tables(
    path: str | Path, columns: list[str] | None = None, batch_rows: int = 4096
) -> Iterator[pa.Table]:
    """Stream a dataset in bounded batches (archives do not fit in memory)."""
    for f in parquet_files(path):
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
            yield pa.Table.from_batches([batch])
