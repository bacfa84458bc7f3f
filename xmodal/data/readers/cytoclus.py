"""CytoClus export: ``<set>_Listmode.csv``, ``<set>_Pulses.csv``, ``<set>_Images/`` (``*_Cropped_<id>.jpg``).

Pulses.csv holds one row per sample, ``Particle ID`` then one column per channel, particles separated
by two all-zero rows (whose ID field is 0 too, and particle ID 0 is a real particle). It is read in
blocks of whole lines, so memory stays bounded on exports of any size. A particle is a run of rows
with one ID; within runs of ID 0, pairs of all-zero rows are separators and what remains is
particle 0. The listmode supplies each particle's ``Sample Length`` (checked against the pulse) and
is read whole (two numbers per particle). Particles with no crop are kept as profile-only records.

Outcome per particle ID, first failing check wins: a malformed listmode row or pulse line ->
``malformed_row`` (a pulse line whose ID cannot be read is charged to its neighbours' particle: the
one above, or the one below when the line starts a particle); a second pulse for an ID ->
``duplicate_id`` for the repeat (the first pulse keeps the ID); an ID with several listmode rows ->
``duplicate_id`` for every row, since which one describes the pulse is ambiguous; an ID missing
from the listmode or the pulses, or a crop with neither -> ``unmatched_id``; then
``length_mismatch``, ``non_finite`` and the image checks (in worker processes).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xmodal.data.channels import ChannelPlan, normalize_name
from xmodal.data.quarantine import DataError, QuarantineEntry, Rejected
from xmodal.data.readers.base import Batch, Item, Task, safe_name
from xmodal.data.readers.delimited import (
    BadLine,
    Dialect,
    decode_header,
    header_names,
    iter_blocks,
    parse_rows,
    sniff_dialect,
)
from xmodal.data.readers.validate import ReaderOptions, check_image, check_profile, read_bytes
from xmodal.data.schema import CHANNELS, make_record

PULSES, LISTMODE, IMAGES = "_Pulses.csv", "_Listmode.csv", "_Images"
CROP = re.compile(r"_Cropped_(\d+)\.(?:jpe?g|png|bmp|tiff?)$", re.IGNORECASE)
BLOCK_BYTES = 8 << 20
PARTICLES_PER_TASK = 256


@dataclass(frozen=True)
class ListmodeRow:
    line: int
    sample_length: str  # the raw field, validated at the join (a malformed row may still carry one)
    problem: str | None  # why the row is malformed, None if well-formed


@dataclass(frozen=True)
class Unit:
    """A particle that passed the structural checks; ``build_particles`` does the rest."""

    pid: int
    values: np.ndarray  # (L, n_channels) in file column order
    line: int  # first pulse line
    sample_length: int
    crop: str | None


def find_sources(src: Path) -> list[tuple[str, Path]]:
    """Export prefixes (``<folder>/<set>``) of every ``*_Pulses.csv`` in ``src`` (or ``src`` itself)."""
    if src.is_file():
        for suffix in (PULSES, LISTMODE):
            if src.name.endswith(suffix):
                prefix = src.with_name(src.name[: -len(suffix)])
                return [(safe_name(prefix.name), prefix)]
        raise DataError(f"{src}: not a CytoClus file (expected a name ending in {PULSES} or {LISTMODE})")
    prefixes = (
        sorted(p.with_name(p.name[: -len(PULSES)]) for p in src.glob(f"*{PULSES}")) if src.is_dir() else []
    )
    if not prefixes:
        raise DataError(f"{src}: no *{PULSES} file (CytoClus export expected)")
    return [(safe_name(p.name), p) for p in prefixes]


def count(prefix: Path) -> int | None:
    """Listmode rows (for progress ETA); None without a listmode (``read_listmode`` says why)."""
    try:
        with open(f"{prefix}{LISTMODE}", "rb") as f:
            return max(0, sum(1 for line in f if line.strip()) - 1)
    except FileNotFoundError:
        return None


def read_listmode(path: str, source: str) -> tuple[dict[int, ListmodeRow], list[QuarantineEntry], set[int]]:
    """-> (first row per ID, entries for rows that own no ID, IDs repeated in the listmode)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(
            f"{path}: listmode file missing; a CytoClus export needs {LISTMODE} beside {PULSES}"
        ) from None
    head, _, body = data.partition(b"\n")
    header_text = decode_header(head, path)
    dialect = sniff_dialect(header_text, body, path)
    sep, header = dialect.sep, header_names(header_text, dialect)
    n_expected = len(header) + dialect.trailing  # a trailing separator ends every row too
    keys = [normalize_name(h) for h in header]
    if "particleid" not in keys or "samplelength" not in keys:
        raise DataError(f"{path}: header lacks 'Particle ID' or 'Sample Length' (has {header[:4]}...)")
    i_id, i_len = keys.index("particleid"), keys.index("samplelength")
    last = max(i_id, i_len)
    rows: dict[int, ListmodeRow] = {}
    orphans: list[QuarantineEntry] = []
    repeated: set[int] = set()
    for n, raw in enumerate(body.split(b"\n"), start=2):
        text = raw.decode("latin-1").strip()
        if not text:
            continue
        n_fields = text.count(sep) + 1  # counted, not split: rows have ~80 fields and two are used
        fields = text.split(sep, last + 1)
        pid = _int(fields[i_id]) if len(fields) > i_id else None
        if pid is None:
            orphans.append(
                QuarantineEntry("malformed_row", path, f"line {n}", f"no particle ID in {text[:80]!r}")
            )
            continue
        if pid in rows:
            repeated.add(pid)
            orphans.append(
                QuarantineEntry(
                    "duplicate_id",
                    path,
                    f"{source}:{pid}",
                    f"line {n} repeats the ID of line {rows[pid].line}",
                )
            )
            continue
        problem = (
            f"listmode line {n} has {n_fields} fields, expected {n_expected}"
            if n_fields != n_expected
            else None
        )
        rows[pid] = ListmodeRow(n, fields[i_len].strip() if len(fields) > i_len else "", problem)
    return rows, orphans, repeated


def _int(text: str) -> int | None:
    try:
        value = float(text.strip().replace(",", "."))
    except ValueError:
        return None
    return int(value) if value.is_integer() and value >= 0 else None


def list_crops(folder: Path) -> dict[int, list[str]]:
    crops: dict[int, list[str]] = {}
    if folder.is_dir():
        for name in sorted(os.listdir(folder)):
            m = CROP.search(name)
            if m:
                crops.setdefault(int(m.group(1)), []).append(str(folder / name))
    return crops


def _segments(ids: np.ndarray, values: np.ndarray) -> Iterator[tuple[int, slice]]:
    """(particle id, row slice) for each particle in complete runs; separators are skipped."""
    bounds = np.concatenate(([0], np.flatnonzero(ids[1:] != ids[:-1]) + 1, [len(ids)]))
    all_zero = ~values.any(axis=1)
    for pid, a, b in zip(ids[bounds[:-1]].tolist(), bounds[:-1].tolist(), bounds[1:].tolist()):
        if pid != 0:
            yield pid, slice(a, b)
            continue
        zero = all_zero[a:b].tolist()
        if zero == [True, True]:  # the usual run of ID 0: one separator pair
            continue
        sep = np.zeros(b - a, dtype=bool)
        k = 0
        while k < b - a:  # pair up consecutive all-zero rows greedily: each pair is one separator
            if zero[k] and k + 1 < b - a and zero[k + 1]:
                sep[k : k + 2] = True
                k += 2
            else:
                k += 1
        keep = np.flatnonzero(~sep)
        if len(keep):
            for chunk in np.split(keep, np.flatnonzero(np.diff(keep) > 1) + 1):
                yield 0, slice(a + chunk[0], a + chunk[-1] + 1)


class _Join:
    """Decides each particle's structural outcome while pulses stream by."""

    def __init__(self, source: str, prefix: Path):
        self.source = source
        self.pulses, self.listmode_path = f"{prefix}{PULSES}", f"{prefix}{LISTMODE}"
        self.listmode, self.orphans, self.repeated = read_listmode(self.listmode_path, source)
        self.crops = list_crops(Path(f"{prefix}{IMAGES}"))
        self.first_line: dict[int, int] = {}  # pulses line where each particle ID was first seen
        self.bad_lines: dict[int, BadLine] = {}  # first malformed pulse line charged to each ID

    def _structural(self, pid: int) -> QuarantineEntry | None:
        """Listmode and pulse-line problems of a particle ID (also used for IDs with no pulse)."""
        item, lm = f"{self.source}:{pid}", self.listmode.get(pid)
        if pid in self.repeated:
            return QuarantineEntry(
                "duplicate_id", self.listmode_path, item, "the ID has several listmode rows"
            )
        if lm is not None and lm.problem:
            return QuarantineEntry("malformed_row", self.listmode_path, item, lm.problem)
        if pid in self.bad_lines:
            b = self.bad_lines[pid]
            return QuarantineEntry(
                "malformed_row", self.pulses, item, f"pulses line {b.line}: {b.why}: {b.text[:80]!r}"
            )
        return None

    def particle(self, pid: int, values: np.ndarray, line: int) -> Unit | QuarantineEntry:
        item = f"{self.source}:{pid}"
        if pid in self.first_line:
            msg = f"particle ID {pid} appears again at pulses line {line} (first at line {self.first_line[pid]})"
            return QuarantineEntry("duplicate_id", self.pulses, item, msg)
        self.first_line[pid] = line
        lm = self.listmode.get(pid)
        problem = self._structural(pid)
        if problem is not None:
            if lm is not None and lm.problem:  # say what the pulse holds: the row may hide a truncation
                note = f"; its Sample Length field reads {lm.sample_length!r} and the pulse has {len(values)} samples"
                problem = QuarantineEntry(problem.reason, problem.file, problem.item, problem.message + note)
            return problem
        if lm is None:
            return QuarantineEntry(
                "unmatched_id", self.pulses, item, f"pulse at line {line} has no listmode row"
            )
        crops = self.crops.get(pid, [])
        if len(crops) > 1:
            return QuarantineEntry(
                "duplicate_id", crops[1], item, f"{len(crops)} crop files for one particle: {crops}"
            )
        length = _int(lm.sample_length)
        if length is None:
            msg = f"listmode line {lm.line}: Sample Length {lm.sample_length!r} is not a whole number"
            return QuarantineEntry("malformed_row", self.listmode_path, item, msg)
        return Unit(pid, values, line, length, crops[0] if crops else None)

    def leftovers(self) -> list[QuarantineEntry]:
        """IDs that never appeared as a pulse: listmode rows, bad-only pulses, crops without particle."""
        out = []
        for pid in sorted(
            (set(self.listmode) | set(self.bad_lines) | set(self.crops)) - set(self.first_line)
        ):
            item, lm = f"{self.source}:{pid}", self.listmode.get(pid)
            problem = self._structural(pid)
            if problem is not None:
                out.append(problem)
            elif lm is not None:
                out.append(
                    QuarantineEntry(
                        "unmatched_id", self.pulses, item, f"listmode line {lm.line} has no pulse"
                    )
                )
            else:
                out.append(
                    QuarantineEntry(
                        "unmatched_id", self.crops[pid][0], item, "crop without listmode row or pulse"
                    )
                )
        return out


def iter_work(prefix: Path, source: str, domain: str, opts: ReaderOptions) -> Iterator[Batch | Task]:
    join = _Join(source, prefix)
    pulses = join.pulses
    if join.orphans:
        yield Batch(seen=len(join.orphans), items=list(join.orphans))
    with open(pulses, "rb") as f:
        head = f.readline()
        sample = f.read(1 << 16)
        f.seek(len(head))
        header = decode_header(head, pulses)
        dialect = sniff_dialect(header, sample, pulses)
        names = header_names(header, dialect)
        if normalize_name(names[0]) != "particleid":
            raise DataError(f"{pulses}: first column is {names[0]!r}, expected 'Particle ID'")
        plan = opts.channel_map.resolve(names[1:], pulses, opts.fill_missing)
        pending: list[Item | Unit] = []
        for ready in _stream_particles(f, len(names), dialect, join, pulses):
            pending.extend(ready)
            while len(pending) >= PARTICLES_PER_TASK:
                yield _task(pending[:PARTICLES_PER_TASK], source, domain, pulses, plan, opts)
                pending = pending[PARTICLES_PER_TASK:]
    pending.extend(join.leftovers())
    if pending:
        yield _task(pending, source, domain, pulses, plan, opts)


def _task(
    items: list, source: str, domain: str, pulses: str, plan: ChannelPlan, opts: ReaderOptions
) -> Batch | Task:
    if not any(isinstance(x, Unit) for x in items):
        return Batch(seen=len(items), items=items)
    return functools.partial(build_particles, items, source, domain, pulses, plan, opts)


def _stream_particles(
    f, ncols: int, dialect: Dialect, join: _Join, pulses: str
) -> Iterator[list[Item | Unit]]:
    carry_ids, carry_vals, carry_lines = (
        np.zeros(0, np.int64),
        np.zeros((0, ncols - 1)),
        np.zeros(0, np.int64),
    )
    blocks = iter_blocks(f, BLOCK_BYTES)
    done = False
    while not done:
        block = next(blocks, None)
        done = block is None
        ready: list[Item | Unit] = []
        if block is not None:
            rows = parse_rows(block[0], ncols, dialect, block[1], threads=True)
            ids = rows.values[:, 0]
            bad_id = (ids != np.floor(ids)) | (ids < 0)
            for i in np.flatnonzero(bad_id):
                rows.bad.append(
                    BadLine(int(rows.lines[i]), repr(ids[i]), "the particle ID is not a whole number")
                )
            ok = ~bad_id
            ids = np.concatenate([carry_ids, ids[ok].astype(np.int64)])
            vals = np.concatenate([carry_vals, rows.values[ok, 1:]])
            lines = np.concatenate([carry_lines, rows.lines[ok]])
            ready.extend(_attribute(rows.bad, ids, vals, lines, dialect.sep, join, pulses))
        else:
            ids, vals, lines = carry_ids, carry_vals, carry_lines
        segments = list(_segments(ids, vals)) if len(ids) else []
        if not done and len(ids):  # the last run of one ID may continue in the next block
            last = _run_start(ids)
            segments = [(p, s) for p, s in segments if s.start < last]
            carry_ids, carry_vals, carry_lines = ids[last:], vals[last:], lines[last:]
        for pid, s in segments:
            ready.append(join.particle(pid, vals[s], int(lines[s.start])))
        yield ready


def _run_start(ids: np.ndarray) -> int:
    change = np.flatnonzero(ids[1:] != ids[:-1])
    return int(change[-1] + 1) if len(change) else 0


def _attribute(
    bad: list[BadLine],
    ids: np.ndarray,
    vals: np.ndarray,
    lines: np.ndarray,
    sep: str,
    join: _Join,
    pulses: str,
) -> list[Item]:
    """Charge each bad pulse line to a particle: its own ID field, else a neighbouring good line's."""
    orphans: list[Item] = []
    for b in bad:
        pid = _int(b.first_field(sep)) if b.text else None
        if pid is None:
            pid = _neighbour(b.line, ids, vals, lines)
        if pid is None or pid in join.first_line:  # nothing to charge it to: it is a unit of its own
            orphans.append(
                QuarantineEntry("malformed_row", pulses, f"line {b.line}", f"{b.why}: {b.text[:80]!r}")
            )
        else:
            join.bad_lines.setdefault(pid, b)
    return orphans


def _neighbour(line: int, ids: np.ndarray, vals: np.ndarray, lines: np.ndarray) -> int | None:
    """The particle of a pulse line whose ID is unreadable: the good line above's, unless that line
    is a separator row or the good line below belongs to another particle (then the bad line is
    the first of the particle below); None when both neighbours are separators."""
    below = int(np.searchsorted(lines, line))
    above = below - 1

    def particle_line(k: int) -> bool:
        return 0 <= k < len(ids) and not (ids[k] == 0 and not vals[k].any())

    if particle_line(above) and not (particle_line(below) and ids[below] != ids[above]):
        return int(ids[above])
    return int(ids[below]) if particle_line(below) else None


def build_particles(
    items: list[Item | Unit], source: str, domain: str, pulses: str, plan: ChannelPlan, opts: ReaderOptions
) -> Batch:
    """Per-particle checks (length, non-finite, image) and records; quarantine entries pass through."""
    out: list[Item] = []
    for u in items:
        if not isinstance(u, Unit):
            out.append(u)
            continue
        item, file = f"{source}:{u.pid}", pulses
        try:
            if len(u.values) != u.sample_length:
                msg = f"pulse at line {u.line} has {len(u.values)} samples; the listmode's Sample Length is {u.sample_length}"
                raise Rejected("length_mismatch", msg)
            profile = plan.apply(u.values.T)
            check_profile(profile, CHANNELS)
            image = None
            if u.crop is not None:
                file = u.crop
                image = check_image(read_bytes(u.crop, "crop", "unreadable_image"), opts)
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
    return Batch(seen=len(items), items=out, channels={pulses: plan.describe()})
