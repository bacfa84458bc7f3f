"""Helpers for the reader and ingest tests (test_readers_*.py, test_ingest*.py), handed to tests as
the ``rd`` fixture (tests run with ``--import-mode=importlib``, so a helper module could not be
imported): real export paths, writable copies to corrupt, an independent Pulses.csv parser, and
readers of what ingest wrote."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from xmodal.data.ingest import ingest

CEFAS = "cytosense_cefas_pond_ecotaxa_pipeline"
ULCO = "cytosense_ulco_ecotaxa_pipeline"
BEADS = "cytosense_beads_cyzfile_api"
CEFAS_SET = "Pond_NA 2023-05-24 09h23_All Imaged Particles"
ULCO_SET = "R4_photos_flr16_2uls_10min 2022-09-14 12h28"
CEFAS_IMAGED = {63, 88, 118, 151}


def cefas_prefix(realdata: Path) -> Path:
    return realdata / CEFAS / "original" / CEFAS_SET


def ulco_prefix(realdata: Path) -> Path:
    return realdata / ULCO / "original" / ULCO_SET


def copy_export(prefix: Path, dest: Path) -> Path:
    """Copy listmode, pulses and the *_Cropped_* crops of an export into ``dest`` (writable)."""
    dest.mkdir(parents=True, exist_ok=True)
    for suffix in ("_Listmode.csv", "_Pulses.csv"):
        shutil.copy(f"{prefix}{suffix}", dest / f"{prefix.name}{suffix}")
    images = Path(f"{prefix}_Images")
    (dest / images.name).mkdir()
    for crop in images.glob("*_Cropped_*"):
        shutil.copy(crop, dest / images.name / crop.name)
    return dest / prefix.name


def pulse_text(pulses: Path) -> dict[int, list[list[str]]]:
    """Independent reading of a Pulses.csv: particle ID -> its rows as text fields (separators dropped).

    Only valid for files where particle 0 comes first or not at all (true of both real exports):
    every all-zero row pair is dropped, every other row goes to the ID in its first field."""
    text = pulses.read_bytes().decode("utf-8-sig")
    sep = ";" if ";" in text.splitlines()[0] else ","
    rows = list(csv.reader(text.splitlines()[1:], delimiter=sep))
    out: dict[int, list[list[str]]] = {}
    for row in rows:
        if all(float(v.replace(",", ".")) == 0 for v in row):
            continue
        out.setdefault(int(row[0]), []).append(row[1:])
    return out


def as_float32(fields: list[list[str]]) -> np.ndarray:
    """Text rows (L x C) -> (C, L) float32 exactly as a decimal string rounds to float32 via float64."""
    return np.array([[float(v.replace(",", ".")) for v in r] for r in fields], dtype=np.float64).T.astype(
        np.float32
    )


def run(src: Path, out: Path, **kwargs: Any) -> tuple[Any, dict[str, dict[str, Any]]]:
    """ingest quietly -> (report, {particle_id: row}) over every domain written."""
    report = ingest(src, out, quiet=True, **kwargs)
    return report, rows_by_id(out, list(report.domains))


def rows_by_id(out: Path, domains: list[str]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for d in domains:
        for f in sorted((out / d).glob("part-*.parquet")):
            for r in pq.read_table(f).to_pylist():
                assert r["particle_id"] not in rows, f"duplicate {r['particle_id']}"
                rows[r["particle_id"]] = r
    return rows


def quarantined(out: Path) -> dict[str, dict[str, str]]:
    """quarantine.jsonl -> {item: entry}."""
    lines = (out / "quarantine.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    return {e["item"]: e for e in entries}


def profile(row: dict[str, Any]) -> np.ndarray:
    return np.asarray(row["profile"], dtype=np.float32).reshape(6, row["profile_length"])


def edit_lines(path: Path, edit, sep: bytes = b"\r\n") -> None:
    """Rewrite a text file through ``edit(list of byte lines) -> list of byte lines``."""
    path.write_bytes(sep.join(edit(path.read_bytes().split(sep))))


def jpeg_with_size(data: bytes, height: int, width: int) -> bytes:
    """Patch a JPEG's frame header (SOF0/SOF2) to claim another size: a decompression-bomb header."""
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        i = data.find(marker)
        if i >= 0:
            return data[: i + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[i + 9 :]
    raise AssertionError("no SOF marker in the JPEG")


@pytest.fixture(scope="session")
def cefas_ingested(
    realdata: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Any, dict[str, dict[str, Any]]]:
    """(report, rows) of the real Cefas CytoClus export, ingested once per session (read-only)."""
    return run(cefas_prefix(realdata).parent, tmp_path_factory.mktemp("cefas"))


@pytest.fixture(scope="session")
def rd() -> SimpleNamespace:
    return SimpleNamespace(
        CEFAS=CEFAS, ULCO=ULCO, BEADS=BEADS, CEFAS_IMAGED=CEFAS_IMAGED,
        cefas_prefix=cefas_prefix, ulco_prefix=ulco_prefix, copy_export=copy_export,
        pulse_text=pulse_text, as_float32=as_float32, run=run, rows_by_id=rows_by_id,
        quarantined=quarantined, profile=profile, edit_lines=edit_lines, jpeg_with_size=jpeg_with_size,
    )  # fmt: skip
