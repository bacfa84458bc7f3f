"""SYKE-plankton_CytoSense layout: ``annotations.csv`` (``image,profile,class[,particle_id]``, paths
relative to the folder, ``/`` or Windows ``\\`` separators; ``;`` or tab separators and a
``label``, ``species``, ``taxon`` or ``category`` column for ``class``, any of them also with a
``_name`` suffix (``class_name``, ``taxon name``), are accepted; header names compare case- and
space-insensitively; UTF-8, or cp1252 as Excel on Windows saves it, which the report notes),
``images/``, ``profiles/`` (one CSV per particle: a header naming the channels, then L rows x C
columns in mV; a second header line of units, ``mV`` or unitless marks, is skipped and noted, other
units are quarantined). The source name is the layout folder's name (``xmodal ingest .`` inside it too),
runs of characters other than letters, digits, ``_ . -`` replaced by ``_``.

Labels: an empty class cell, ``unlabelled`` and the missing-value markers of spreadsheets and pandas
(``NA``, ``N/A``, ``nan``, ``None``, ``null``, counted in a note) are unlabelled; without a class
column every particle is unlabelled, and the report notes it with the names it would accept.

One annotation row is one particle. A row that ends before its optional cells (class, particle id,
any column after ``image`` and ``profile``: spreadsheets drop trailing empty cells) is read as if
they were empty. Annotation-level problems (too many fields, too few to hold the image and profile
cells, a repeated particle id: the first row keeps the id) are decided while reading
annotations.csv; file-level problems (path escaping the folder, missing file, image and profile
checks) in ``read_rows``, which ingest runs in worker processes on chunks of rows. A profile whose
header cannot be mapped to the channels at all (a missing or damaged header, or pandas' column
numbers ``0,1,...``, for which the message gives the ``--channel-map`` YAML) quarantines that
particle as ``malformed_row`` (ingest notes a source none of whose particles was ingested); a header
that lacks some channels stops the ingest with an error naming the file and the channels, as in the
other readers (map them with ``--channel-map`` or zero-fill them with ``--fill-missing``). Particle
ids are ``<source>:<particle_id>``, or ``<source>:<image path>`` when the column or its cell is
absent. An empty ``image`` (or ``profile``) cell gives a profile-only (image-only) particle.
"""

from __future__ import annotations

import csv
import functools
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from xmodal.data.channels import NoChannelHeader, normalize_name
from xmodal.data.quarantine import DataError, QuarantineEntry, Rejected
from xmodal.data.readers.base import Batch, Item, Task, safe_name
from xmodal.data.readers.delimited import Dialect, decode_text, parse_many, split_header
from xmodal.data.readers.validate import ReaderOptions, check_image, check_profile, read_bytes, safe_path
from xmodal.data.schema import CHANNELS, UNLABELLED, make_record
from xmodal.data.transforms import to_gray8

ANNOTATIONS = "annotations.csv"
# how spreadsheets and pandas write a missing value: unlabelled too, but counted in a note, since a
# class could (rarely) be named so
MISSING_VALUES = {"na", "n/a", "nan", "none", "null"}
ROWS_PER_TASK = 256
HEADER_SAMPLE = 64  # images looked at for a scale-bar header (--crop-header auto)
CLASS_NAMES = ("class", "label", "species", "taxon", "category")  # preferred first; also "<name>_name"
CLASS_KEYS = tuple(k for name in CLASS_NAMES for k in (name, name + "name"))  # as normalize_name gives them
ANNOTATION_SEPARATORS = (",", ";", "\t")  # ties (a one-column header) go to ","


@dataclass(frozen=True)
class Row:
    line: int  # line in annotations.csv
    pid: str
    image: str  # relative path, "" = none
    profile: str
    label: str | None


def find_sources(src: Path) -> list[tuple[str, Path]]:
    """One layout folder (annotations.csv inside), or a root whose sub-folders are layouts."""
    src = Path(os.path.abspath(src))  # '.' has no name
    if (src / ANNOTATIONS).is_file():
        return [(safe_name(src.name), src)]
    layouts = sorted(p for p in src.iterdir() if (p / ANNOTATIONS).is_file()) if src.is_dir() else []
    if not layouts:
        raise DataError(f"{src}: no {ANNOTATIONS} in the folder or in its sub-folders (SYKE layout expected)")
    return [(safe_name(p.name), p) for p in layouts]


def read_annotations(layout: Path, source: str) -> tuple[list[Row], list[QuarantineEntry], list[str]]:
    """-> (rows, entries for rows that are no particle, notes on how the file was read)."""
    path = layout / ANNOTATIONS
    text, encoding = decode_text(path.read_bytes())
    notes = []
    if encoding != "utf-8":
        notes.append(
            f"{path} is not UTF-8; read as {encoding} (Windows 'ANSI', e.g. Excel's "
            "'CSV (Comma delimited)'): check the class names, or save it as 'CSV UTF-8'"
        )
    # spreadsheets in decimal-comma locales save CSV with ';' (and some tools with tabs): the
    # separator is the one that splits the header line most
    sep = max(ANNOTATION_SEPARATORS, key=text.partition("\n")[0].count)
    reader = csv.reader(io.StringIO(text), delimiter=sep)
    names = next(reader, [])
    header = [normalize_name(h) for h in names]
    missing = [c for c in ("image", "profile") if c not in header]
    if missing:
        raise DataError(
            f"{path}: header {header} lacks column(s) {missing}; expected image,profile,class[,particle_id]"
        )
    col = {name: header.index(name) for name in ("image", "profile", "particleid") if name in header}
    class_key = next((k for k in CLASS_KEYS if k in header), None)  # the first name found wins
    if class_key is not None:
        col["class"] = header.index(class_key)
    else:  # a column under another name would silently leave every particle unlabelled
        notes.append(
            f"{path}: no class column, so every particle is unlabelled; the header has {names}. To read "
            f"the classes, name their column one of {list(CLASS_NAMES)}, or that with '_name' (class_name)"
        )
    needed = max(col["image"], col["profile"]) + 1  # fields a row needs to hold both paths
    rows: list[Row] = []
    bad: list[QuarantineEntry] = []
    first_line: dict[str, int] = {}
    read_as_missing: dict[str, int] = {}
    short: list[tuple[int, int]] = []  # (line, cells) of rows padded with empty cells
    for fields in reader:
        line = reader.line_num
        if not any(f.strip() for f in fields):
            continue
        if needed <= len(fields) < len(header):  # only optional cells left off the end: empty
            # (a cell left out in the middle cannot be told apart: the note lets the user check)
            short.append((line, len(fields)))
            fields += [""] * (len(header) - len(fields))
        if len(fields) != len(header):
            lacking = " and ".join(repr(c) for c in ("image", "profile") if col[c] >= len(fields))
            why = (
                f"the row ends before its {lacking} cell (write an empty cell for none)"
                if lacking
                else f"too many cells: quote a cell that holds the separator {sep!r}"
            )
            bad.append(
                _entry(
                    "malformed_row",
                    path,
                    f"line {line}",
                    f"{len(fields)} fields, expected {len(header)} ({','.join(names)}): {fields}; {why}",
                )
            )
            continue
        image, profile = fields[col["image"]].strip(), fields[col["profile"]].strip()
        if not image and not profile:
            bad.append(
                _entry("malformed_row", path, f"line {line}", "both the image and the profile cell are empty")
            )
            continue
        pid = fields[col["particleid"]].strip() if "particleid" in col else ""
        pid = pid or image or profile
        if pid in first_line:
            msg = f"line {line} repeats particle id {pid!r} of line {first_line[pid]} (the first row is kept)"
            bad.append(_entry("duplicate_id", path, f"{source}:{pid}", msg))
            continue
        first_line[pid] = line
        label = fields[col["class"]].strip() if "class" in col else ""
        if label.casefold() in MISSING_VALUES:
            read_as_missing[label] = read_as_missing.get(label, 0) + 1
            label = ""
        rows.append(Row(line, pid, image, profile, None if label.casefold() in UNLABELLED else label))
    if read_as_missing:
        cells = ", ".join(f"{v!r} x{n}" for v, n in sorted(read_as_missing.items()))
        notes.append(
            f"{path}: {sum(read_as_missing.values())} class cell(s) read as unlabelled ({cells}): "
            "spreadsheets and pandas write these for a missing value"
        )
    if short:
        missing_names = ", ".join(names[min(n for _, n in short) :])
        notes.append(
            f"{len(short)} row(s) of {path} had fewer cells than its header (e.g. line {short[0][0]}); "
            f"their missing last cells ({missing_names}) were read as empty"
        )
    return rows, bad, notes


def iter_work(layout: Path, source: str, domain: str, opts: ReaderOptions) -> Iterator[Batch | Task]:
    rows, bad, notes = read_annotations(layout, source)
    if bad or notes:
        yield Batch(seen=len(bad), items=list(bad), notes=notes)
    root = os.path.normpath(os.path.abspath(layout))
    for i in range(0, len(rows), ROWS_PER_TASK):
        yield functools.partial(read_rows, root, source, domain, rows[i : i + ROWS_PER_TASK], opts)


def sample_images(layout: Path, n: int = HEADER_SAMPLE) -> list[np.ndarray]:
    """Up to ``n`` of the layout's images, evenly spaced over annotations.csv, as 2-D gray arrays
    (for ``header.detect_header``). Unreadable ones are skipped here: ingest quarantines them."""
    rows = [r for r in read_annotations(layout, layout.name)[0] if r.image]
    root = os.path.normpath(os.path.abspath(layout))
    out = []
    for i in sorted({int(round(x)) for x in np.linspace(0, len(rows) - 1, min(n, len(rows)))}):
        try:
            with Image.open(safe_path(root, rows[i].image)) as im:
                out.append(np.asarray(to_gray8(im)))
        except (Rejected, OSError, ValueError, Image.DecompressionBombError):
            continue
    return out


def count(layout: Path) -> int:
    """Annotation rows (for progress ETA), without parsing them."""
    with open(layout / ANNOTATIONS, "rb") as f:
        return max(0, sum(1 for line in f if line.strip()) - 1)


def read_rows(root: str, source: str, domain: str, rows: list[Row], opts: ReaderOptions) -> Batch:
    """Check and read a chunk of annotation rows -> one Batch (records and quarantine entries, in row order)."""
    out: list[Item | None] = [None] * len(rows)
    images: dict[int, tuple[bytes, tuple[int, int]] | None] = {}
    profiles: dict[int, tuple[str, bytes]] = {}
    for i, row in enumerate(rows):
        file = os.path.join(root, ANNOTATIONS)
        try:
            image_path = safe_path(root, row.image) if row.image else None
            profile_path = safe_path(root, row.profile) if row.profile else None
            if profile_path is not None:
                file = profile_path
                profiles[i] = (profile_path, read_bytes(profile_path, "profile", "malformed_row"))
            images[i] = None
            if image_path is not None:
                file = image_path
                images[i] = check_image(read_bytes(image_path, "image", "unreadable_image"), opts)
        except Rejected as r:
            profiles.pop(i, None)
            out[i] = _entry(r.reason, file, f"{source}:{row.pid}", r.message)
    parsed, channels, notes = _parse_profiles(profiles, source, rows, opts, out)
    for i, row in enumerate(rows):
        if out[i] is None:
            image, hw = images[i] or (None, None)
            profile, mask = parsed.get(i, (None, None))
            out[i] = make_record(f"{source}:{row.pid}", source, domain, row.label, image, hw, profile, mask)
    items = [item for item in out if item is not None]
    return Batch(seen=len(rows), items=items, channels=channels, notes=notes)


def _parse_profiles(
    profiles: dict[int, tuple[str, bytes]],
    source: str,
    rows: list[Row],
    opts: ReaderOptions,
    out: list[Item | None],
) -> tuple[dict[int, tuple], dict[str, dict], list[str]]:
    """Parse profile files grouped by header (one pyarrow call per group); failures go into ``out``."""
    groups: dict[tuple[bytes, Dialect, tuple[str, ...]], list[tuple[int, bytes]]] = {}
    names: dict[tuple[bytes, Dialect, tuple[str, ...]], list[str]] = {}
    notes: list[str] = []
    for i, (path, data) in profiles.items():
        head = data.split(b"\n", 1)[0]
        try:
            cols, dialect, body, units = split_header(data, path)
        except DataError as e:
            out[i] = _entry("malformed_row", path, f"{source}:{rows[i].pid}", str(e))
            continue
        if units and (head, dialect, units) not in groups:
            notes.append(
                f"{source}: profile files have a line of units under the header ({', '.join(units)}); "
                "it was skipped and the values read as mV"
            )
        groups.setdefault((head, dialect, units), []).append((i, body))
        names[(head, dialect, units)] = cols
    parsed: dict[int, tuple] = {}
    channels: dict[str, dict] = {}
    for key, members in groups.items():
        first_path = profiles[members[0][0]][0]
        try:
            plan = opts.channel_map.resolve(names[key], "line 1 (header)", opts.fill_missing)
        except NoChannelHeader as e:  # a missing or damaged header: these particles only, not the ingest
            for i, _ in members:
                out[i] = _entry("malformed_row", profiles[i][0], f"{source}:{rows[i].pid}", str(e))
            continue
        except DataError as e:  # channels to map or zero-fill: the user decides, for every file alike
            raise DataError(f"{first_path}: {e}") from None
        channels[first_path] = plan.describe()
        bodies = [b for _, b in members]
        for (i, _), parsed_rows in zip(members, parse_many(bodies, len(names[key]), key[1], 3 if key[2] else 2)):
            path, pid = profiles[i][0], f"{source}:{rows[i].pid}"
            if parsed_rows.bad:
                b = parsed_rows.bad[0]
                out[i] = _entry("malformed_row", path, pid, f"line {b.line}: {b.why}: {b.text[:120]!r}")
            elif len(parsed_rows.values) == 0:
                out[i] = _entry("malformed_row", path, pid, "the profile has a header but no samples")
            else:
                profile = plan.apply(parsed_rows.values.T)
                try:
                    check_profile(profile, CHANNELS)
                except Rejected as r:
                    out[i] = _entry(r.reason, path, pid, r.message)
                    continue
                parsed[i] = (profile, plan.mask)
    return parsed, channels, notes


def _entry(reason: str, file: str | Path, item: str, message: str) -> QuarantineEntry:
    return QuarantineEntry(reason, str(file), item, message)
