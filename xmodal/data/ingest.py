"""``xmodal ingest SRC OUT``: instrument exports -> ``OUT/<DOMAIN>/part-*.parquet`` + a reconciling report.

Each source found under SRC (a SYKE layout, a CytoClus export, a cyz2json file) goes to
``OUT/<domain>`` (the source's name, or ``domain`` for all of them). Readers cut the work into tasks
that run in-process or, where the tasks outweigh the main process's share, in a process pool
(``runner.py``); results are consumed in order, so output is deterministic. A domain's shards are written to a
temporary folder and replace the old ``part-*.parquet`` files only once the domain is complete, so a
re-run gives the same output, never duplicates, and a failed run leaves the previous data intact.

``OUT/ingest_report.json`` holds counts per domain and per quarantine reason, the first examples,
the channel mapping used and the readers' notes (e.g. a file read as cp1252, not UTF-8; also in the
summary); ``OUT/quarantine.jsonl`` lists every quarantined particle. ``seen == ingested +
quarantined`` is checked for every domain. Several ingests may write into one OUT (one export per
domain): domains an earlier ingest wrote and this one leaves in place stay in the report
(``earlier``, with the SRC they came from) and their entries stay in the quarantine log.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from xmodal.data.channels import ChannelMap
from xmodal.data.quarantine import DataError, Quarantine, QuarantineEntry
from xmodal.data.readers import DEFAULT_MAX_PIXELS, ReaderOptions, detect_format, get_reader
from xmodal.data.readers.cytoclus import IMAGES, LISTMODE, PULSES
from xmodal.data.readers.header import detect_header, too_few_images
from xmodal.data.readers.validate import pil_pixel_limit
from xmodal.data.runner import OrderedRunner
from xmodal.data.schema import ShardWriter

REPORT_NAME = "ingest_report.json"
QUARANTINE_NAME = "quarantine.jsonl"
PROGRESS_EVERY_S = 2.0
_DOMAIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass
class DomainReport:
    seen: int = 0
    ingested: int = 0
    quarantined: int = 0
    with_image: int = 0
    profile_only: int = 0
    labelled: int = 0  # ingested particles with a class; the rest are unlabelled (label null)
    unlabelled: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    channels: list[dict[str, Any]] = field(default_factory=list)  # distinct mappings, with an example file
    crop_header_px: dict[str, int] = field(default_factory=dict)  # source -> rows cut off each image's top
    notes: list[str] = field(default_factory=list)  # the readers' notes on how files were read
    runner: str = ""  # where the tasks ran: "in-process" or "pool" (runner.py says how it chooses)


@dataclass
class IngestReport:
    src: str
    out: str
    format: str
    options: dict[str, Any]
    domains: dict[str, DomainReport] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    elapsed_s: float = 0.0
    earlier: dict[str, dict[str, Any]] = field(default_factory=dict)  # domains kept from earlier ingests

    @property
    def seen(self) -> int:
        return sum(d.seen for d in self.domains.values())

    @property
    def ingested(self) -> int:
        return sum(d.ingested for d in self.domains.values())

    @property
    def quarantined(self) -> int:
        return sum(d.quarantined for d in self.domains.values())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(seen=self.seen, ingested=self.ingested, quarantined=self.quarantined)
        d["particles_per_s"] = round(self.seen / self.elapsed_s, 1) if self.elapsed_s > 0 else None
        return d

    def summary(self) -> str:
        with_image = sum(d.with_image for d in self.domains.values())
        lines = [
            f"ingest {self.src} ({self.format}): {self.seen} particles seen, {self.ingested} ingested "
            f"({with_image} with image, {self.ingested - with_image} profile-only), {self.quarantined} quarantined"
        ]
        if self.reasons:
            lines.append("  quarantined: " + ", ".join(f"{r} {n}" for r, n in sorted(self.reasons.items())))
        for name, d in self.domains.items():
            lines.append(
                f"  {name}: {d.ingested} particles ({d.labelled} labelled, {d.unlabelled} unlabelled) "
                f"in {len(d.shards)} shard(s) -> {Path(self.out) / name}"
            )
            lines.extend(f"  note: {note}" for note in d.notes)
        for name, d in self.earlier.items():
            lines.append(
                f"  {name}: {d.get('ingested')} particles kept from an earlier ingest of {d.get('src')} "
                f"-> {Path(self.out) / name}"
            )
        rate = f" ({self.seen / self.elapsed_s:.0f} particles/s)" if self.elapsed_s > 0 else ""
        lines.append(
            f"  report {Path(self.out) / REPORT_NAME}, quarantine log {Path(self.out) / QUARANTINE_NAME}; "
            f"{self.elapsed_s:.1f} s{rate}"
        )
        return "\n".join(lines)


class _Progress:
    def __init__(self, domain: str, expected: int | None, quiet: bool):
        self.domain, self.expected, self.quiet = domain, expected, quiet
        self.start = self.last = time.perf_counter()

    def update(self, d: DomainReport, final: bool = False) -> None:
        now = time.perf_counter()
        if self.quiet or (not final and now - self.last < PROGRESS_EVERY_S):
            return
        self.last = now
        rate = d.seen / max(now - self.start, 1e-9)
        total = f"/{self.expected}" if self.expected else ""
        eta = (
            f", ETA {max(self.expected - d.seen, 0) / rate:.0f} s"
            if self.expected and rate > 0 and not final
            else ""
        )
        print(
            f"ingest {self.domain}: {d.seen}{total} particles ({d.quarantined} quarantined), {rate:.0f}/s{eta}",
            file=sys.stderr,
            flush=True,
        )


def _check_domain(name: str) -> str:
    if not _DOMAIN.match(name) or name in (".", ".."):
        raise DataError(
            f"domain {name!r} is not a usable folder name; pass --domain NAME (letters, digits, _ . -)"
        )
    return name


def _replace_shards(tmp: Path, dest: Path, written: list[Path]) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("part-*.parquet"):
        old.unlink()
    moved = []
    for p in written:
        target = dest / p.name
        os.replace(p, target)
        moved.append(str(target))
    shutil.rmtree(tmp, ignore_errors=True)
    return moved


def _ingest_domain(
    name: str,
    sources: list[tuple[str, Path]],
    reader: Any,
    opts: ReaderOptions,
    out: Path,
    quarantine: Quarantine,
    runner: OrderedRunner,
    max_shard_bytes: int,
    quiet: bool,
    auto_header: bool = False,
) -> DomainReport:
    report = DomainReport(sources=[str(p) for _, p in sources])
    counts = [reader.count(p) for _, p in sources]
    expected = None if None in counts else sum(counts)
    progress = _Progress(name, expected, quiet)
    runner.expect(expected)
    tmp = out / f".{name}.ingest-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    mappings: dict[str, dict[str, Any]] = {}
    writer = ShardWriter(tmp, max_shard_bytes=max_shard_bytes)
    try:
        for source, path in sources:
            source_opts, header_note = _header_options(reader, path, source, opts, auto_header, quiet)
            if header_note:
                report.notes.append(header_note)
            report.crop_header_px[source] = source_opts.crop_header_px
            before = (report.ingested, report.quarantined)
            first: dict[str, QuarantineEntry] = {}  # this source's first entry per reason
            for table, entries, seen, channels, notes in runner.run(
                reader.iter_work(path, source, name, source_opts)
            ):
                for entry in entries:
                    quarantine.add(entry)
                    report.reasons[entry.reason] = report.reasons.get(entry.reason, 0) + 1
                    first.setdefault(entry.reason, entry)
                if table is not None:
                    writer.write_table(table)
                    report.ingested += table.num_rows
                    report.with_image += int(pc.sum(table["has_image"]).as_py() or 0)
                    report.labelled += table.num_rows - table["label"].null_count
                report.seen += seen
                report.notes.extend(n for n in notes if n not in report.notes)  # once, not per task
                report.quarantined += len(entries)
                for file, mapping in channels.items():
                    mappings.setdefault(
                        json.dumps(mapping, sort_keys=True), {"example_file": file, **mapping}
                    )
                progress.update(report)
            if first and report.ingested == before[0]:
                report.notes.append(_nothing_ingested_note(source, report.quarantined - before[1], first))
        written = writer.close()
    except BaseException:
        writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if report.seen != report.ingested + report.quarantined or writer.rows != report.ingested:
        raise RuntimeError(
            f"internal error in the {reader.__name__} reader: domain {name} saw {report.seen} particles but "
            f"ingested {report.ingested} (written {writer.rows}) + quarantined {report.quarantined}"
        )
    report.runner = runner.mode if runner.mode != "measuring" else "in-process"  # too few tasks to choose
    report.profile_only = report.ingested - report.with_image
    report.unlabelled = report.ingested - report.labelled
    report.channels = list(mappings.values())
    report.shards = _replace_shards(tmp, out / name, written)
    progress.update(report, final=True)
    return report


def _nothing_ingested_note(source: str, n: int, first: dict[str, QuarantineEntry]) -> str:
    """A source whose every particle was quarantined is almost always one problem shared by all its
    files (e.g. profiles written without channel names): say so once, with the first particle's
    message per reason (which says how to fix it), instead of leaving only a per-particle log."""
    examples = "; ".join(f"{reason}, e.g. {e.describe()}" for reason, e in first.items())
    return f"{source}: none of its {n} particle(s) was ingested, all were quarantined: {examples}"


def _previous_domains(out: Path) -> dict[str, dict[str, Any]]:
    """The domains the report in OUT accounts for (its own and those it kept), each with its SRC."""
    try:
        old = json.loads((out / REPORT_NAME).read_text())
    except (OSError, ValueError):
        return {}
    domains = dict(old.get("earlier", {}))
    for name, d in old.get("domains", {}).items():
        domains[name] = {"src": old.get("src"), "format": old.get("format"), **d}
    return domains


def _of_source(file: Path, source: Path) -> bool:
    """``file`` is ``source`` or lies under it as a path (``/d/LAB2/x`` is not under ``/d/LAB``), or
    ``source`` is a CytoClus export prefix (``<folder>/<set>``) and ``file`` one of its
    ``<set>_Listmode.csv``, ``<set>_Pulses.csv`` or ``<set>_Images`` (or a crop in it)."""
    if file == source or source in file.parents:
        return True
    for suffix in (LISTMODE, PULSES, IMAGES):
        part = source.with_name(source.name + suffix)
        if file == part or part in file.parents:
            return True
    return False


def _carry_log(old_log: Path, new_log: Path, kept: dict[str, dict[str, Any]]) -> None:
    """Appends the old log's entries of the kept domains (matched by their source paths) to the new."""
    sources = [Path(s) for d in kept.values() for s in d.get("sources", []) if s]
    if not sources or not old_log.exists():
        return
    with old_log.open() as f, new_log.open("a") as g:
        for line in f:
            try:
                file = str(json.loads(line).get("file", ""))
            except (ValueError, AttributeError):
                continue
            if file and any(_of_source(Path(file), s) for s in sources):
                g.write(line)


def _header_options(
    reader: Any, path: Path, source: str, opts: ReaderOptions, auto: bool, quiet: bool
) -> tuple[ReaderOptions, str | None]:
    """``opts`` with the source's scale-bar header height when ``auto`` (readers whose crops carry
    no header, CytoClus and cyz2json, have no ``sample_images``: 0), and a note for the report when
    the source has too few images to tell whether its crops carry a header."""
    if not auto or not hasattr(reader, "sample_images"):
        return opts, None
    images = reader.sample_images(path)
    few = too_few_images(images)
    note = None
    if few is not None:
        note = (
            f"{source}: too few images ({few}) to detect a scale-bar header; "
            "pass --crop-header N if the crops carry one"
        )
    rows = detect_header(images)
    if rows and not quiet:
        print(
            f"ingest {source}: the images share a {rows}-px scale-bar header; cropping it "
            "(--crop-header 0 keeps it)",
            file=sys.stderr,
            flush=True,
        )
    return dataclasses.replace(opts, crop_header_px=rows), note


def ingest(
    src: str | Path,
    out: str | Path,
    fmt: str | None = None,
    strict: bool = False,
    domain: str | None = None,
    crop_header_px: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    channel_map: ChannelMap | Mapping[str, str] | str | Path | None = None,
    fill_missing: bool = False,
    max_shard_bytes: int = 128 * 2**20,
    workers: int | None = None,
    quiet: bool = False,
) -> IngestReport:
    """Read SRC (format detected unless ``fmt``), write ``OUT/<domain>/part-*.parquet``, the report and
    the quarantine log; return the report. ``strict`` raises ``DataError`` at the first quarantined
    particle. ``channel_map``: extra channel-name entries (dict) or a YAML file (see ``channels.py``).
    ``crop_header_px``: rows cut off the top of every image; None finds a scale-bar header per source
    (``readers/header.py``; the rows found are in each domain's report)."""
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    fmt = fmt or detect_format(src)
    reader = get_reader(fmt)
    opts = ReaderOptions(crop_header_px or 0, max_pixels, ChannelMap.coerce(channel_map), fill_missing)
    by_domain: dict[str, list[tuple[str, Path]]] = {}
    names: dict[str, Path] = {}
    for source, path in reader.find_sources(src):
        if source in names:  # particle ids are "<source>:<id>": two sources must not share a name
            raise DataError(
                f"{names[source]} and {path} both get the source name {source!r}; ingest them separately"
            )
        names[source] = path
        by_domain.setdefault(_check_domain(domain or source), []).append((source, path))
    report = IngestReport(
        str(src),
        str(out),
        fmt,
        {
            "strict": strict,
            "domain": domain,
            "crop_header_px": "auto" if crop_header_px is None else crop_header_px,
            "max_pixels": max_pixels,
            "channel_map": str(channel_map)
            if isinstance(channel_map, (str, Path))
            else opts.channel_map.extra,
            "fill_missing": fill_missing,
            "max_shard_bytes": max_shard_bytes,
        },
    )
    out.mkdir(parents=True, exist_ok=True)
    previous = _previous_domains(out)
    report.earlier = {
        n: d for n, d in previous.items() if n not in by_domain and any((out / n).glob("part-*.parquet"))
    }
    runner = OrderedRunner(workers if workers is not None else min(2, os.cpu_count() or 1), max_pixels)
    log = out / f".{QUARANTINE_NAME}.tmp"  # replaces the old log only when the run succeeds
    try:
        with Quarantine(log, strict=strict) as quarantine, pil_pixel_limit(max_pixels):
            for name, sources in by_domain.items():
                report.domains[name] = _ingest_domain(
                    name,
                    sources,
                    reader,
                    opts,
                    out,
                    quarantine,
                    runner,
                    max_shard_bytes,
                    quiet,
                    auto_header=crop_header_px is None,
                )
            report.reasons, report.examples = dict(quarantine.counts), dict(quarantine.examples)
        _carry_log(out / QUARANTINE_NAME, log, report.earlier)
        for name, d in report.domains.items():
            old_sources = {str(Path(p).resolve()) for p in previous.get(name, {}).get("sources", [])}
            if old_sources and old_sources != {str(Path(p).resolve()) for p in d.sources}:
                d.notes.append(
                    f"replaced {out / name}: it held {previous[name].get('ingested')} particles from "
                    f"{sorted(old_sources)} (an earlier ingest of {previous[name].get('src')})"
                )
    except BaseException:
        log.unlink(missing_ok=True)
        raise
    finally:
        runner.close()
    os.replace(log, out / QUARANTINE_NAME)
    report.elapsed_s = round(time.perf_counter() - t0, 3)
    (out / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report
