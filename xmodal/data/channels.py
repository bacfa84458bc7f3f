"""Instrument channel names -> the canonical channels ``FWS, SWS, FL Yellow, FL Orange, FL Red, Curvature``.

CytoSense software names the same detector differently per instrument and per export tool
(``Sidewards Scatter`` vs ``SWS`` vs ``SWS HS``; ``Fl Red`` vs ``FL Red HS``; forward scatter as one
``FWS`` channel or as ``FWS L`` + ``FWS R``). The table below maps a *source expression* to a
canonical channel; a source expression is one name, or several joined by ``+`` whose pulses are
summed sample by sample. Names are compared ignoring case, whitespace, ``_``, ``-`` and ``.``
(``FL-Red``, ``Fl. Red`` and ``FL_RED`` are all ``FL Red``). A name that matches no entry as it is
is compared once more without a trailing unit in brackets (``FWS (mV)``, ``FL Red [mV]`` are
``FWS``, ``FL Red``); the exact name wins, so brackets that tell two columns apart (``FL Red (HS)``,
``FL Red (LS)``) can still be told apart by a user entry.

For each canonical channel the entries are tried in order and the first whose names are all present
in the file wins, so the table also states the preference between alternatives (a direct ``FWS``
over ``FWS L + FWS R``, high-sensitivity ``HS`` over low-sensitivity ``LS``). Users extend it with a
mapping (or a YAML file of ``source expression: canonical``); their entries are tried before the
defaults, so they can both add names and change preferences::

    # channels.yaml  (xmodal ingest SRC OUT --channel-map channels.yaml)
    SWS LS: SWS            # prefer the low-sensitivity side scatter
    FL Green: FL Yellow    # an instrument that names its yellow channel differently

A canonical channel that no entry can fill is an error naming the file and the channel, or, with
``fill_missing``, an all-zero channel whose ``channel_mask`` entry is False. A file in which no
canonical channel can be filled at all (a missing or damaged header) is an error even with
``fill_missing``: zero-filling it would store a profile of zeros. A channel name that appears twice
is an error only when the table would use it. Channels are always placed by name, never by column
position.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from xmodal.data.quarantine import DataError
from xmodal.data.schema import CHANNELS, N_CHANNELS

# (source expression, canonical channel), in order of preference within each canonical channel.
DEFAULT_CHANNEL_MAP: tuple[tuple[str, str], ...] = (
    ("FWS", "FWS"),
    ("Forward Scatter", "FWS"),
    ("FWS L + FWS R", "FWS"),
    ("Forward Scatter Left + Forward Scatter Right", "FWS"),
    ("FWS HS", "FWS"),
    ("FWS LS", "FWS"),
    ("FSC", "FWS"),  # the generic flow-cytometry names, which other tools write for CytoSense data
    ("SWS", "SWS"),
    ("Sidewards Scatter", "SWS"),
    ("Sideward Scatter", "SWS"),
    ("Side Scatter", "SWS"),
    ("SWS HS", "SWS"),
    ("SWS LS", "SWS"),
    ("SSC", "SWS"),
    ("FL Yellow", "FL Yellow"),
    ("FL Yellow HS", "FL Yellow"),
    ("FL Yellow LS", "FL Yellow"),
    ("Fluorescence Yellow", "FL Yellow"),
    ("Yellow Fluorescence", "FL Yellow"),
    ("FL Orange", "FL Orange"),
    ("FL Orange HS", "FL Orange"),
    ("FL Orange LS", "FL Orange"),
    ("Fluorescence Orange", "FL Orange"),
    ("Orange Fluorescence", "FL Orange"),
    ("FL Red", "FL Red"),
    ("FL Red HS", "FL Red"),
    ("FL Red LS", "FL Red"),
    ("Fluorescence Red", "FL Red"),
    ("Red Fluorescence", "FL Red"),
    ("Curvature", "Curvature"),
)


class NoChannelHeader(DataError):
    """A first line of numbers where the header should be: a file without its header line (a data
    problem of that file), not an instrument whose channel names need mapping."""


def _looks_like_data(field: str) -> bool:
    """A header field that is a number or empty: the "header" is a line of data (no header line)."""
    text = field.strip().replace(",", ".")
    try:
        float(text)
    except ValueError:
        return not text
    return True


_SPACE = re.compile(r"[\s_.-]+")


def normalize_name(name: str) -> str:
    """``' Fl. Red-HS '`` -> ``'flredhs'``: the key under which channel names are compared."""
    return _SPACE.sub("", name).casefold()


_UNIT = re.compile(r"(?:\([^()]*\)|\[[^\[\]]*\])$")  # on a normalized key: no spaces before it


def without_unit(key: str) -> str:
    """A normalized key without its trailing ``(unit)`` / ``[unit]``: ``'fws(mv)'`` -> ``'fws'``;
    a key that is nothing but brackets stays as it is (an empty key would match nothing useful)."""
    return _UNIT.sub("", key) or key


_CANONICAL = {normalize_name(c): c for c in CHANNELS}


def numbered_columns_fix(names: Sequence[str]) -> str:
    """How to map a header of column numbers ``0..n-1`` (pandas' ``to_csv`` of a frame without column
    names, after an unnamed index column if it wrote one); "" for any other header. The suggested
    YAML assumes the canonical order only as an example: the message says to check it, since numbers
    say nothing about which detector a column holds."""
    numbers = [n.strip() for n in names]
    if numbers[:1] == [""]:  # pandas' index column: unnamed, and unused by the map below
        numbers = numbers[1:]
    if not numbers or numbers != [str(i) for i in range(len(numbers))]:
        return ""
    mapping = ", ".join(f'"{i}": {c}' for i, c in zip(range(len(numbers)), CHANNELS))
    fewer = ""
    if len(numbers) < len(CHANNELS):
        fewer = f" There are {len(numbers)} columns for {len(CHANNELS)} channels: add --fill-missing."
    return (
        f": the header numbers the columns 0..{len(numbers) - 1} (as pandas writes a frame without column "
        f"names) instead of naming the channels. Name them with --channel-map FILE, a YAML file mapping "
        f"each column number to the channel it holds; if the columns are in the order {list(CHANNELS)}, "
        f"FILE is {{{mapping}}} (check the order: xmodal does not guess it).{fewer}"
    )


def _parse_expression(expr: str, where: str) -> tuple[str, ...]:
    parts = tuple(normalize_name(p) for p in str(expr).split("+"))
    if not all(parts):
        raise DataError(f"{where}: channel source {expr!r} has an empty name (write e.g. 'FWS L + FWS R')")
    return parts


def _canonical(name: Any, where: str) -> str:
    key = normalize_name(str(name))
    if key not in _CANONICAL:
        raise DataError(f"{where}: {name!r} is not a canonical channel; use one of {list(CHANNELS)}")
    return _CANONICAL[key]


@dataclass(frozen=True)
class ChannelPlan:
    """How one file's columns become the canonical channels (resolved once per header)."""

    source_names: tuple[str, ...]  # the file's channel names, in file order
    sources: tuple[tuple[int, ...], ...]  # per canonical channel: file column indices summed; () = absent
    mask: tuple[bool, ...]  # per canonical channel: False = absent, zero-filled

    def apply(self, matrix: np.ndarray) -> np.ndarray:
        """(n_source_channels, L) values in file order -> (N_CHANNELS, L) float32, canonical order."""
        m = np.asarray(matrix, dtype=np.float64)
        if m.ndim != 2 or m.shape[0] != len(self.source_names):
            raise ValueError(f"expected ({len(self.source_names)}, L) values, got {m.shape}")
        if all(len(idx) == 1 for idx in self.sources):  # the usual case: a gather, no sums
            return m[[idx[0] for idx in self.sources]].astype(np.float32)
        out = np.zeros((N_CHANNELS, m.shape[1]), dtype=np.float64)
        for c, idx in enumerate(self.sources):
            for i in idx:
                out[c] += m[i]
        return out.astype(np.float32)

    def used_keys(self) -> set[str]:
        """The normalized names of the file channels this plan reads (a name repeated among them
        is ambiguous; one repeated elsewhere is harmless)."""
        return {normalize_name(self.source_names[i]) for idx in self.sources for i in idx}

    def describe(self) -> dict[str, Any]:
        """For the ingest report: which file channels fed each canonical channel, and which were unused."""
        used: set[int] = {i for idx in self.sources for i in idx}
        return {
            "mapping": {
                c: " + ".join(self.source_names[i] for i in idx) if idx else None
                for c, idx in zip(CHANNELS, self.sources)
            },
            "unused": [n for i, n in enumerate(self.source_names) if i not in used],
        }


class ChannelMap:
    """The mapping table: user entries (tried first) followed by ``DEFAULT_CHANNEL_MAP``."""

    def __init__(self, extra: Mapping[str, str] | None = None, where: str = "channel map"):
        self.extra = {str(k): str(v) for k, v in (extra or {}).items()}  # the user's entries, for reports
        entries: list[tuple[tuple[str, ...], str, str]] = []
        for expr, canonical in list((extra or {}).items()) + list(DEFAULT_CHANNEL_MAP):
            entries.append(
                (_parse_expression(expr, where), _canonical(canonical, f"{where}: {expr!r}"), expr)
            )
        self.entries = tuple(entries)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ChannelMap:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise DataError(f"channel map file not found: {path}") from None
        except yaml.YAMLError as e:
            raise DataError(f"{path}: not valid YAML: {e}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise DataError(
                f"{path}: expected a mapping 'source channel name: canonical channel', got {data!r}"
            )
        return cls(data, where=str(path))

    @classmethod
    def coerce(cls, value: ChannelMap | Mapping[str, str] | str | Path | None) -> ChannelMap:
        """Accept a ChannelMap, a dict of extra entries, a YAML path, or None (defaults)."""
        if isinstance(value, ChannelMap):
            return value
        if isinstance(value, (str, Path)):
            return cls.from_yaml(value)
        return cls(value)

    def resolve(self, names: Sequence[str], where: str, fill_missing: bool = False) -> ChannelPlan:
        """Plan for a file whose channels are ``names`` (in file order); ``where`` names the file."""
        keys = [normalize_name(n) for n in names]
        bare = [without_unit(k) for k in keys]

        def columns(part: str) -> list[int]:
            """The file columns an entry's name matches: by exact name, else without units."""
            return [i for i, k in enumerate(keys) if k == part] or [
                i for i, k in enumerate(bare) if k == without_unit(part)
            ]

        sources: list[tuple[int, ...]] = []
        missing: list[str] = []
        ambiguous: set[str] = set()
        for canonical in CHANNELS:
            chosen: tuple[int, ...] = ()
            for parts, target, _ in self.entries:
                found = [columns(p) for p in parts] if target == canonical else []
                if found and all(found):
                    chosen = tuple(f[0] for f in found)
                    ambiguous.update(names[i] for f in found if len(f) > 1 for i in f)
                    break
            if not chosen:
                missing.append(canonical)
            sources.append(chosen)
        plan = ChannelPlan(tuple(names), tuple(sources), tuple(bool(s) for s in sources))
        if ambiguous:
            raise DataError(
                f"{where}: channel(s) {sorted(ambiguous)} appear more than once (or differ only in "
                f"brackets); cannot tell which to use. Name the one to use with --channel-map FILE "
                f"(YAML 'column name: canonical')."
            )
        if len(missing) == len(CHANNELS) and all(_looks_like_data(n) for n in names):
            fix = numbered_columns_fix(names) or (
                f"{self._unknown_hint(names)}; is the header line missing or damaged? It must name the "
                "channels (or map them with --channel-map FILE)."
            )
            raise NoChannelHeader(
                f"{where}: not one canonical channel {list(CHANNELS)} can be filled from the columns "
                f"{list(names)}{fix}"
            )
        if missing and (not fill_missing or len(missing) == len(CHANNELS)):  # all zeros is no profile
            raise DataError(
                f"{where}: no column for canonical channel(s) {missing}; the file has {list(names)}"
                f"{self._unknown_hint(names)}. Map a column with --channel-map FILE (YAML 'column name: "
                f"canonical'), or pass --fill-missing to zero-fill the channel and mark it in channel_mask."
            )
        return plan

    def _unknown_hint(self, names: Iterable[str]) -> str:
        known = {k for parts, _, _ in self.entries for p in parts for k in (p, without_unit(p))}
        unknown = [n for n in names if not {normalize_name(n), without_unit(normalize_name(n))} & known]
        return f" (not in the channel table: {unknown})" if unknown else ""
