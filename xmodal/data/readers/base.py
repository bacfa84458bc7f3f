"""What every reader hands to ingest: batches of records (``schema.make_record`` dicts) and
quarantine entries, each batch carrying how many particles it covers.

A reader's ``iter_work(path, source, domain, opts)`` yields, in output order, either a finished
``Batch`` or a ``Task`` (a picklable zero-argument callable returning a ``Batch``) that ingest may
run in a worker process. ``Batch.seen`` is counted by the reader from its input (annotation rows,
particle ids), independently of what the checks decided, so that ingest can verify
``seen == ingested + quarantined`` and catch a particle that slipped through without an outcome.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xmodal.data.quarantine import QuarantineEntry

Item = dict[str, Any] | QuarantineEntry


@dataclass
class Batch:
    seen: int
    items: list[Item] = field(default_factory=list)
    channels: dict[str, Any] = field(default_factory=dict)  # file -> ChannelPlan.describe(), for the report
    notes: list[str] = field(default_factory=list)  # what the user should know (a file read as cp1252)


Task = Callable[[], Batch]


def safe_name(text: str) -> str:
    """A source / default domain name from a file name: accents dropped (``Utö`` -> ``Uto``), then
    runs of characters other than letters, digits, ``_ . -`` become '_'."""
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", plain).strip("_")
