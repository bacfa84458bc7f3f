"""cyz2json JSON (CytoBuoy's converter of ``.cyz`` files; ``.json`` or ``.json.gz``).

Used keys: ``instrument.channels[].description`` (the file's channel names, mapped through
``channels.py``), ``particles[].particleId`` and ``particles[].pulseShapes[].{description, values}``
(mV), ``images[].{particleId, base64, cropRectangle{X, Y, Width, Height}}``. An image whose
cropRectangle is smaller than the decoded picture is cropped to it (cyz2json may export the full
camera frame with the crop box); an image of the rectangle's size is that crop already (cyz2json's
image-processing option) and is kept as it is. Particles without an entry in ``images`` are
profile-only records; ``hasImage`` is not trusted (cyz2json only writes images whose stream is
non-empty). A particleId may be a number or a string of digits; base64 may be wrapped in lines;
file suffixes compare case-insensitively (``.JSON``). An instrument channel named twice is an
error only if the channel map uses it.

One particles[] entry is one particle; a repeated particleId is quarantined (the first keeps it),
and so is an ID with several images; an image whose ID has no particle is ``unmatched_id``.
The document is parsed whole with ``json`` (a streaming JSON parser is not a dependency).
"""

from __future__ import annotations

import base64
import binascii
import functools
import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from xmodal.data.channels import ChannelPlan, normalize_name
from xmodal.data.quarantine import DataError, QuarantineEntry, Rejected
from xmodal.data.readers.base import Batch, Item, Task, safe_name
from xmodal.data.readers.validate import ReaderOptions, check_image, check_profile
from xmodal.data.schema import CHANNELS, make_record

SUFFIXES = (".json", ".json.gz")
PARTICLES_PER_TASK = 256


def is_json_name(name: str) -> bool:
    return name.lower().endswith(SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return safe_name(name)


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def looks_like_cyz2json(path: Path) -> bool:
    """A .json(.gz) file whose first 4 KiB hold cyz2json's 'instrument' key (it follows 'filename')."""
    if not path.is_file() or not is_json_name(path.name):
        return False
    try:
        with _open(path) as f:
            head = f.read(4096)
    except (OSError, EOFError):
        return True  # unreadable: let load() report it with the file name
    return b'"instrument"' in head


def find_sources(src: Path) -> list[tuple[str, Path]]:
    if src.is_file():
        if not is_json_name(src.name):
            raise DataError(f"{src}: not a cyz2json file (expected .json or .json.gz)")
        return [(_stem(src), src)]
    files = sorted(p for p in src.iterdir() if looks_like_cyz2json(p)) if src.is_dir() else []
    if not files:
        raise DataError(f"{src}: no cyz2json .json / .json.gz file (with an 'instrument' key near the start)")
    return [(_stem(p), p) for p in files]


def count(path: Path) -> None:
    return None  # unknown until the document is parsed


def load(path: Path) -> dict[str, Any]:
    try:
        with _open(path) as f:
            doc = json.loads(f.read().decode("utf-8-sig"))
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read as cyz2json JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("particles"), list):
        raise DataError(f"{path}: no 'particles' list at the top level (cyz2json layout expected)")
    return doc


def channel_names(doc: dict[str, Any], path: Path) -> list[str]:
    try:
        return [str(c["description"]) for c in doc["instrument"]["channels"]]
    except (KeyError, TypeError):
        raise DataError(f"{path}: no instrument.channels[].description (cyz2json layout expected)") from None


def iter_work(path: Path, source: str, domain: str, opts: ReaderOptions) -> Iterator[Batch | Task]:
    doc = load(path)
    names = channel_names(doc, path)
    plan = opts.channel_map.resolve(names, str(path), opts.fill_missing)
    file = str(path)
    images: dict[Any, list[dict[str, Any]]] = {}
    for img in doc.get("images") or []:
        key = img.get("particleId") if isinstance(img, dict) else None
        pid = _id(key)
        images.setdefault(repr(key) if pid is None else pid, []).append(img)
    seen: set[int] = set()
    pending: list[Any] = []
    for j, p in enumerate(doc["particles"]):
        raw = p.get("particleId") if isinstance(p, dict) else None
        pid = _id(raw)
        if pid is None:
            pending.append(
                QuarantineEntry(
                    "malformed_row", file, f"particles[{j}]", f"particleId {raw!r} is not an integer"
                )
            )
        elif pid in seen:
            pending.append(
                QuarantineEntry("duplicate_id", file, f"{source}:{pid}", f"particles[{j}] repeats the ID")
            )
        elif len(images.get(pid, [])) > 1:
            seen.add(pid)
            n = len(images[pid])
            pending.append(
                QuarantineEntry("duplicate_id", file, f"{source}:{pid}", f"{n} images for one particle")
            )
        else:
            seen.add(pid)
            pending.append((pid, p.get("pulseShapes"), (images.get(pid) or [None])[0]))
        if len(pending) >= PARTICLES_PER_TASK:
            yield functools.partial(build_particles, pending, source, domain, file, names, plan, opts)
            pending = []
    for pid, imgs in images.items():
        if pid not in seen:
            for _ in imgs:
                pending.append(
                    QuarantineEntry(
                        "unmatched_id", file, f"{source}:{pid}", "image whose particleId has no particle"
                    )
                )
    if pending:
        yield functools.partial(build_particles, pending, source, domain, file, names, plan, opts)


def _id(value: Any) -> int | None:
    """A particleId: an integer, or a string of digits ("5"); None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdecimal():
        return int(value)
    return None


def _profile(shapes: Any, names: list[str], used: set[str]) -> np.ndarray:
    """pulseShapes -> (n_channels, L) float64 in instrument channel order. ``used``: the normalized
    names the channel plan reads; only those must not appear twice."""
    if not isinstance(shapes, list):
        raise Rejected("malformed_row", "no pulseShapes list")
    by_name: dict[str, Any] = {}
    for s in shapes:
        if not isinstance(s, dict):
            raise Rejected(
                "malformed_row", f"pulse shape {s!r:.60} is not an object with description and values"
            )
        key = normalize_name(str(s.get("description", "")))
        if key in by_name and key in used:
            raise Rejected("malformed_row", f"pulse shape {s.get('description')!r} appears twice")
        by_name.setdefault(key, s.get("values"))
    missing = [n for n in names if normalize_name(n) not in by_name]
    if missing:
        raise Rejected("malformed_row", f"no pulse shape for instrument channel(s) {missing}")
    try:
        rows = [np.asarray(by_name[normalize_name(n)], dtype=np.float64) for n in names]
    except (TypeError, ValueError) as e:
        raise Rejected("malformed_row", f"pulse values are not numbers: {e}") from None
    lengths = {n: r.shape for n, r in zip(names, rows)}
    if any(r.ndim != 1 for r in rows) or len({r.shape for r in rows}) != 1:
        raise Rejected("length_mismatch", f"channels differ in length: {lengths}")
    if rows[0].shape[0] == 0:
        raise Rejected("malformed_row", "pulse shapes have no samples")
    return np.stack(rows)


def _image(entry: dict[str, Any], opts: ReaderOptions) -> tuple[bytes, tuple[int, int]]:
    text = entry.get("base64") or ""
    if not isinstance(text, str):
        raise Rejected("unreadable_image", f"base64 is a {type(text).__name__}, not a string")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)  # MIME wraps lines
    except (binascii.Error, ValueError) as e:
        raise Rejected("unreadable_image", f"base64 does not decode: {e}") from None
    rect = entry.get("cropRectangle")
    box = None
    if rect is not None:
        try:
            box = (int(rect["X"]), int(rect["Y"]), int(rect["Width"]), int(rect["Height"]))
        except (KeyError, TypeError, ValueError):
            raise Rejected(
                "malformed_row", f"cropRectangle {rect!r} lacks integer X, Y, Width, Height"
            ) from None
    return check_image(data, opts, crop_box=box)


def build_particles(
    items: list[Any],
    source: str,
    domain: str,
    file: str,
    names: list[str],
    plan: ChannelPlan,
    opts: ReaderOptions,
) -> Batch:
    out: list[Item] = []
    used = plan.used_keys()
    for u in items:
        if isinstance(u, QuarantineEntry):
            out.append(u)
            continue
        pid, shapes, image_entry = u
        item = f"{source}:{pid}"
        try:
            profile = plan.apply(_profile(shapes, names, used))
            check_profile(profile, CHANNELS)
            image = _image(image_entry, opts) if image_entry is not None else None
        except Rejected as r:
            out.append(QuarantineEntry(r.reason, file, item, r.message))
            continue
        out.append(
            make_record(
                item,
                source,
                domain,
                None,
                image[0] if image else None,
                image[1] if image else None,
                profile,
                plan.mask,
            )
        )
    return Batch(seen=len(items), items=out, channels={file: plan.describe()})
