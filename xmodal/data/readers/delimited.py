"""Numeric delimited text (CytoClus exports, SYKE profile CSVs): dialect sniffing and exact parsing.

Exports come with ``,`` or ``;`` (or tab) separators, ``.`` or ``,`` decimals, a UTF-8 BOM and CRLF
line ends; some tools quote the header names (R's ``write.csv``: ``"FWS","SWS"``) or end every line
with a separator (``a,b,c,``: the empty last column is ignored); ``np.savetxt`` starts the header
line with ``# `` (dropped). Text that is not UTF-8 is read as
cp1252 (Windows "ANSI", what Excel writes on Western-European systems). CR-only line ends (classic
Mac OS) are read in small whole files and named in an error in streamed ones.

Parsing has a fast path (pyarrow's CSV reader, ~3x faster per value than ``np.loadtxt``, and it
amortises its call overhead when many small files are parsed as one buffer) and an exact slow path
(Python, line by line) that only runs on blocks the fast path did not parse cleanly, to say which
line is wrong and why. Both paths give identical numbers (``float()`` and pyarrow both round a
decimal string to the nearest double).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from xmodal.data.quarantine import DataError

BOM = b"\xef\xbb\xbf"
_SEPARATORS = (";", ",", "\t")


@dataclass(frozen=True)
class Dialect:
    sep: str
    decimal: str
    trailing: bool = False  # every line ends with a separator: one more, empty, field to ignore


@dataclass
class BadLine:
    line: int  # 1-based line number in the file
    text: str
    why: str

    def first_field(self, sep: str) -> str:
        return self.text.split(sep, 1)[0].strip()


@dataclass
class Rows:
    values: np.ndarray  # (n, ncols) float64, good rows only
    lines: np.ndarray  # (n,) int64, 1-based file line number of each good row
    bad: list[BadLine]


def decode_text(raw: bytes) -> tuple[str, str]:
    """Bytes -> (text, "utf-8" or "cp1252"): UTF-8 (a BOM is dropped); else line by line, UTF-8
    where a line is UTF-8 (a file edited in two programs keeps its UTF-8 lines) and cp1252
    (Windows "ANSI") or, for its five unassigned bytes, latin-1 where not: nothing is ever
    replaced by U+FFFD."""
    raw = raw[len(BOM) :] if raw.startswith(BOM) else raw
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    return "\n".join(_decode_legacy(line) for line in raw.split(b"\n")), "cp1252"


def _decode_legacy(line: bytes) -> str:
    for encoding in ("utf-8", "cp1252"):
        try:
            return line.decode(encoding)
        except UnicodeDecodeError:
            pass
    return line.decode("latin-1")


def decode_line(raw: bytes) -> str:
    return decode_text(raw)[0].strip("\r\n")


def decode_header(raw: bytes, where: str) -> str:
    """A file's first line (bytes up to the first LF) -> text; an error if it holds a bare CR, i.e.
    the file has CR-only (classic Mac OS) line endings and the "line" is the whole file."""
    text = decode_line(raw)
    if "\r" in text:
        raise DataError(
            f"{where}: CR-only line endings (classic Mac OS): the first line runs on into the data; "
            "save the file with LF or CRLF line endings"
        )
    return text


def sniff_dialect(header: str, sample: bytes, where: str) -> Dialect:
    """Separator = the candidate that splits the header most; decimal ',' only with a non-','
    separator and a ',' somewhere in ``sample`` (data lines); ``trailing`` if the header's last
    name is empty, or the first data line ends with the separator AND has exactly one field more
    than the header (a separator at the end of every data line; a line that merely ends with an
    empty last value has as many fields as the header)."""
    counts = {s: header.count(s) for s in _SEPARATORS}
    sep = max(_SEPARATORS, key=lambda s: counts[s])
    if counts[sep] == 0:
        raise DataError(f"{where}: header {header!r} has no ';', ',' or tab separator")
    decimal = "," if sep != "," and b"," in sample else "."
    # some writers end only the data lines with a separator: the first data line tells
    first = sample.lstrip(b"\r\n").split(b"\n", 1)[0].decode("latin-1").strip()
    trailing = _unquote(header.rsplit(sep, 1)[1]) == "" or (
        first.endswith(sep) and len(first.split(sep)) == len(header.split(sep)) + 1
    )
    return Dialect(sep, decimal, trailing=trailing)


def _unquote(name: str) -> str:
    name = name.strip()
    if len(name) >= 2 and name[0] == name[-1] == '"':
        name = name[1:-1].strip()
    return name


def header_names(header: str, dialect: Dialect) -> list[str]:
    """Column names of a header line: spaces and surrounding double quotes removed, the empty name
    after a trailing separator dropped, and a ``#`` that starts the line dropped: ``np.savetxt``
    writes its header as a comment (``# FWS,SWS,...``)."""
    fields = header.split(dialect.sep)
    fields[0] = fields[0].lstrip().lstrip("#")
    names = [_unquote(n) for n in fields]
    return names[:-1] if dialect.trailing and names[-1] == "" else names


# A line of units under the header: short words or marks, optionally bracketed ("mV", "(mV)", "[a.u.]")
_UNIT = re.compile(r"^[(\[]?\s*[A-Za-z\u00b5\u03bc%./-]{0,8}\s*[)\]]?$")
MV_UNITS = frozenset({"mv", "a.u.", "a.u", "au", "arb.", "arb", "-", ""})  # mV, or marked unitless
_MISSING = frozenset({"na", "n/a", "nan", "null", "none"})  # missing values, not units


def units_row(line: str, dialect: Dialect, ncols: int) -> list[str] | None:
    """The units of a line that holds one per column and no number (``mV,mV,...,a.u.``), else None."""
    fields = [_unquote(f) for f in line.strip().split(dialect.sep)]
    if dialect.trailing and len(fields) == ncols + 1 and fields[-1] == "":
        fields.pop()
    if len(fields) != ncols or not any(fields):
        return None
    for f in fields:
        if f and (f.lower() in _MISSING or _is_number(f, dialect.decimal) or not _UNIT.match(f)):
            return None
    return fields


def split_header(data: bytes, where: str) -> tuple[list[str], Dialect, bytes, tuple[str, ...]]:
    """Whole small file -> (column names, dialect, body bytes, units of a units line skipped after
    the header: empty when there is none).
    A second header line of units is skipped when every unit is mV or a unitless mark (the values
    are read as mV); other units are a ``DataError``, as is a header that cannot be read (each
    message starts with the line it concerns). CR-only line endings are read as line ends
    (the file is in memory anyway)."""
    if b"\n" not in data:
        data = data.replace(b"\r", b"\n")
    head, _, body = data.partition(b"\n")
    try:
        header = decode_header(head, where)
        dialect = sniff_dialect(header, body, where)
    except DataError as e:
        raise DataError(f"line 1: {e}") from None
    names = header_names(header, dialect)
    first, _, rest = body.partition(b"\n")
    units = units_row(first.decode("latin-1"), dialect, len(names))
    if units is None:
        return names, dialect, body, ()
    if any(u.strip("()[] ").lower() not in MV_UNITS for u in units):
        raise DataError(
            f"line 2 gives the units {units}: profiles are read in mV; convert the values to mV "
            "(or drop that line if they are mV already)"
        )
    return names, dialect, rest, tuple(units)


def _line_count(body: bytes) -> int:
    return body.count(b"\n") + 1 if body else 0


def _parse_fast(body: bytes, ncols: int, dialect: Dialect, threads: bool = False) -> np.ndarray | None:
    """(n, ncols) float64 if pyarrow parses every line as ncols numbers, else None."""
    names = [f"c{i}" for i in range(ncols)]
    columns = names + ["trailing"] if dialect.trailing else names  # the trailing column is not read
    try:
        table = pacsv.read_csv(
            io.BytesIO(body),
            read_options=pacsv.ReadOptions(column_names=columns, use_threads=threads, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(delimiter=dialect.sep),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.float64() for n in names},
                decimal_point=dialect.decimal,
                include_columns=names,
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None
    # pyarrow skips blank lines and reads empty fields as null: let the exact path report those.
    if table.num_rows != _line_count(body) or any(col.null_count for col in table.columns):
        return None
    return np.column_stack([col.to_numpy() for col in table.columns])


def _parse_slow(body: bytes, ncols: int, dialect: Dialect, first_line: int) -> Rows:
    values: list[list[float]] = []
    lines: list[int] = []
    bad: list[BadLine] = []
    for i, raw in enumerate(body.split(b"\n")):
        text = raw.decode("latin-1").strip()
        if not text:
            continue
        fields = text.split(dialect.sep)
        if dialect.trailing and len(fields) == ncols + 1:  # the unnamed column is ignored, as in _parse_fast
            fields.pop()
        if len(fields) != ncols:
            bad.append(BadLine(first_line + i, text, f"{len(fields)} fields, expected {ncols}"))
            continue
        try:
            row = [float(f.strip().replace(dialect.decimal, ".")) for f in fields]
        except ValueError:
            j = next(j for j, f in enumerate(fields) if not _is_number(f, dialect.decimal))
            bad.append(BadLine(first_line + i, text, f"field {j + 1} ({fields[j]!r}) is not a number"))
            continue
        values.append(row)
        lines.append(first_line + i)
    arr = np.array(values, dtype=np.float64).reshape(len(values), ncols)
    return Rows(arr, np.array(lines, dtype=np.int64), bad)


def _is_number(field: str, decimal: str) -> bool:
    try:
        float(field.strip().replace(decimal, "."))
        return True
    except ValueError:
        return False


def parse_rows(body: bytes, ncols: int, dialect: Dialect, first_line: int, threads: bool = False) -> Rows:
    """Parse lines of ``ncols`` numbers; ``first_line`` is the file line number of the body's first line.
    ``threads``: let pyarrow parse one large block on several threads."""
    body = body.rstrip()
    fast = _parse_fast(body, ncols, dialect, threads)
    if fast is None:
        return _parse_slow(body, ncols, dialect, first_line)
    return Rows(fast, np.arange(first_line, first_line + len(fast), dtype=np.int64), [])


def parse_many(bodies: list[bytes], ncols: int, dialect: Dialect, first_line: int = 2) -> list[Rows]:
    """Parse many small files' bodies in one pyarrow call; files that fail are re-parsed alone."""
    bodies = [b.rstrip() for b in bodies]
    counts = [_line_count(b) for b in bodies]
    fast = _parse_fast(b"\n".join(b for b in bodies if b), ncols, dialect)
    if fast is None or len(fast) != sum(counts):
        return [parse_rows(b, ncols, dialect, first_line) for b in bodies]
    out: list[Rows] = []
    start = 0
    for n in counts:
        out.append(Rows(fast[start : start + n], np.arange(first_line, first_line + n, dtype=np.int64), []))
        start += n
    return out


def iter_blocks(f: BinaryIO, block_bytes: int) -> Iterator[tuple[bytes, int]]:
    """Yield (block of whole lines, 1-based line number of its first line) from a file positioned
    after its header line (line 1)."""
    line = 2
    rest = b""
    while True:
        chunk = f.read(block_bytes)
        if not chunk:
            break
        data = rest + chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            rest = data
            continue
        block, rest = data[: cut + 1], data[cut + 1 :]
        yield block, line
        line += block.count(b"\n")
    if rest.strip():
        yield rest, line
