"""Readers of instrument exports into paired-particle records: SYKE layout, CytoClus export, cyz2json.

Every reader module offers the same three functions:

    find_sources(src: Path) -> list[(source name, path)]    the layouts / exports / files under src
    count(path) -> int | None                                particles expected (progress ETA)
    iter_work(path, source, domain, opts) -> Iterator[Batch | Task]   see ``readers.base``

``detect_format`` picks the reader from what SRC contains; ``--format`` overrides it.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from xmodal.data.quarantine import DataError
from xmodal.data.readers import cytoclus, cyz2json, syke
from xmodal.data.readers.base import Batch, Task
from xmodal.data.readers.validate import DEFAULT_MAX_PIXELS, ReaderOptions

READERS: dict[str, ModuleType] = {"syke": syke, "cytoclus": cytoclus, "cyz2json": cyz2json}

__all__ = ["READERS", "Batch", "DEFAULT_MAX_PIXELS", "ReaderOptions", "Task", "detect_format", "get_reader"]


def get_reader(fmt: str) -> ModuleType:
    try:
        return READERS[fmt]
    except KeyError:
        raise DataError(f"unknown format {fmt!r}; use one of {sorted(READERS)}") from None


def _signatures(src: Path) -> list[str]:
    if src.is_file():
        if cyz2json.is_json_name(src.name):
            return ["cyz2json"]
        if src.name.endswith((cytoclus.PULSES, cytoclus.LISTMODE)):
            return ["cytoclus"]
        return []
    found = []
    if (src / syke.ANNOTATIONS).is_file() or any(
        (p / syke.ANNOTATIONS).is_file() for p in src.iterdir() if p.is_dir()
    ):
        found.append("syke")
    if any(src.glob(f"*{cytoclus.PULSES}")):
        found.append("cytoclus")
    if any(cyz2json.looks_like_cyz2json(p) for p in src.iterdir()):
        found.append("cyz2json")
    return found


def detect_format(src: str | Path) -> str:
    """'syke' | 'cytoclus' | 'cyz2json' from the files in ``src``; an error if none or several match."""
    src = Path(src)
    if not src.exists():
        raise DataError(f"{src}: no such file or folder")
    found = _signatures(src)
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError(
            f"{src}: cannot tell the format: expected annotations.csv (SYKE layout, here or in sub-folders), "
            f"*{cytoclus.PULSES} + *{cytoclus.LISTMODE} (CytoClus export), or *.json / *.json.gz (cyz2json)"
        )
    raise DataError(f"{src}: looks like several formats {found}; choose one with --format")
