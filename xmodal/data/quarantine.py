"""Quarantine: every particle that is not ingested is recorded here with a machine-readable reason.

Readers never drop a particle silently: a particle that fails a check becomes a ``QuarantineEntry``
(reason code, file, row / particle id, message). ``Quarantine`` counts entries per reason, keeps the
first examples for the report, streams every entry to ``quarantine.jsonl`` and, in strict mode,
turns the first entry into a ``DataError`` so that ``xmodal ingest --strict`` stops at the first
problem with a message naming the file and the particle.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

# Reason code -> what it means. The codes are stable: reports and scripts match on them.
REASONS: dict[str, str] = {
    "malformed_row": "a row with the wrong number of fields, a value that is not a number, or a record "
    "whose structure is broken (e.g. a listmode row cut or merged by an editor, a profile CSV whose "
    "header is missing, names no channel or only numbers the columns)",
    "length_mismatch": "the pulse shape has a different number of samples than the listmode's Sample "
    "Length, or the channels of one particle differ in length",
    "non_finite": "a pulse value is NaN or infinite (or overflows float32)",
    "unreadable_image": "the image bytes cannot be decoded (truncated, corrupt, not an image, bad base64), "
    "or its crop cannot be re-encoded as PNG",
    "empty_image": "the image shows no object: neither sharp edges nor a faint or soft-edged particle stand "
    "out from the smooth background (a failed crop), or nothing is left after the header crop",
    "image_too_large": "the image has more pixels than the configured limit (decompression-bomb guard); "
    "it is rejected from its header, before decoding",
    "path_escape": "a path in annotations.csv leaves the dataset folder ('../', or absolute outside it)",
    "duplicate_id": "the particle id was already used by an earlier particle of the same source",
    "missing_file": "a file named by annotations.csv does not exist",
    "unmatched_id": "a particle id found in one file of an export (listmode, pulses, images) but not in "
    "the one that must accompany it",
}

MAX_EXAMPLES = 5  # per reason, in the report


class DataError(ValueError):
    """Bad input that stops an ingest: names the file, the row or particle, and what is wrong."""


class Rejected(Exception):
    """Raised by a check inside a reader; the reader turns it into a ``QuarantineEntry``."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown quarantine reason {reason!r}; known: {sorted(REASONS)}")
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class QuarantineEntry:
    reason: str  # one of REASONS
    file: str  # the file that holds the problem
    item: str  # particle id, or "line N" when no id can be read
    message: str

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown quarantine reason {self.reason!r}; known: {sorted(REASONS)}")

    def describe(self) -> str:
        return f"{self.file}: {self.item}: {self.reason}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


class Quarantine:
    """Collects entries: counts per reason, first examples, a JSON-lines log, strict-mode failure."""

    def __init__(self, log_path: str | Path | None = None, strict: bool = False):
        self.strict = strict
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[dict[str, str]]] = {}
        self._log: IO[str] | None = open(log_path, "w") if log_path is not None else None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, entry: QuarantineEntry) -> None:
        if self.strict:
            raise DataError(
                f"{entry.describe()}\n(--strict stops at the first problem; without it the particle is "
                f"quarantined and listed in ingest_report.json)"
            )
        self.counts[entry.reason] = self.counts.get(entry.reason, 0) + 1
        examples = self.examples.setdefault(entry.reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(entry.to_dict())
        if self._log is not None:
            self._log.write(json.dumps(entry.to_dict()) + "\n")

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Quarantine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
