"""Channel-name mapping: defaults for the real instruments, sums, preferences, user extensions, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xmodal.data.channels import ChannelMap, normalize_name
from xmodal.data.quarantine import DataError
from xmodal.data.schema import CHANNELS

CEFAS = ["FWS", "Sidewards Scatter", "Fl Yellow", "Fl Orange", "Fl Red", "Curvature"]
BEADS = ["FWS", "SWS HS", "SWS LS", "FL Yellow LS", "FL Red LS", "FL Yellow HS", "FL Orange HS", "FL Red HS",
         "Curvature", "FWS L", "FWS R"]  # fmt: skip


def _matrix(n: int, length: int = 5) -> np.ndarray:
    return np.random.default_rng(n).uniform(-1, 7488, (n, length))


def test_names_compare_without_case_spaces_underscores_hyphens_or_dots() -> None:
    assert normalize_name(" Fl  Red_HS ") == normalize_name("FL Red HS") == "flredhs"
    assert normalize_name("FL-Red") == normalize_name("Fl. Red") == normalize_name("FL_RED") == "flred"


def test_real_instrument_names_map_by_name_not_position() -> None:
    cmap = ChannelMap()
    plan = cmap.resolve(CEFAS, "cefas")
    m = _matrix(6)
    np.testing.assert_array_equal(plan.apply(m), m.astype(np.float32))
    order = [5, 2, 0, 4, 1, 3]  # the same columns, shuffled: same canonical result
    shuffled = cmap.resolve([CEFAS[i] for i in order], "shuffled")
    np.testing.assert_array_equal(shuffled.apply(m[order]), m.astype(np.float32))


@pytest.mark.parametrize(
    "names",
    [
        ["FSC", "SSC", "Fluorescence Yellow", "Fluorescence Orange", "Fluorescence Red", "Curvature"],
        ["Forward Scatter", "Side Scatter", "Yellow Fluorescence", "Orange Fluorescence", "Red fluorescence",
         "curvature"],
    ],
    ids=["abbreviated", "spelled-out"],
)  # fmt: skip
def test_generic_cytometry_names_map_too(names) -> None:
    m = _matrix(6)
    np.testing.assert_array_equal(ChannelMap().resolve(names, "other tool").apply(m), m.astype(np.float32))


def test_beads_prefer_direct_fws_and_high_sensitivity() -> None:
    plan = ChannelMap().resolve(BEADS, "beads")
    m = _matrix(11)
    expected = m[[0, 1, 5, 6, 7, 8]].astype(np.float32)
    np.testing.assert_array_equal(plan.apply(m), expected)
    assert plan.describe()["unused"] == ["SWS LS", "FL Yellow LS", "FL Red LS", "FWS L", "FWS R"]


def test_fws_left_plus_right_is_summed_when_there_is_no_fws() -> None:
    names = ["FWS L", "FWS R", "SWS", "FL Yellow", "FL Orange", "FL Red", "Curvature"]
    plan = ChannelMap().resolve(names, "ulco")
    m = _matrix(7)
    out = plan.apply(m)
    assert out[0].tolist() == (m[0] + m[1]).astype(np.float32).tolist()
    np.testing.assert_array_equal(out[1:], m[2:].astype(np.float32))
    assert plan.describe()["mapping"]["FWS"] == "FWS L + FWS R"


def test_user_entries_extend_and_take_precedence(tmp_path: Path) -> None:
    yaml_file = tmp_path / "channels.yaml"
    yaml_file.write_text("SWS LS: SWS\nfl green: fl yellow\n")
    plan = ChannelMap.coerce(yaml_file).resolve(BEADS, "beads")
    assert plan.describe()["mapping"]["SWS"] == "SWS LS"
    names = ["FWS", "SWS", "FL Green", "FL Orange", "FL Red", "Curvature"]
    assert (
        ChannelMap.coerce({"FL Green": "FL Yellow"}).resolve(names, "x").describe()["mapping"]["FL Yellow"]
        == "FL Green"
    )


def test_missing_channel_error_names_file_and_channel_or_zero_fills() -> None:
    names = ["FWS", "SWS", "FL Green", "FL Orange", "FL Red", "Curvature"]
    with pytest.raises(DataError) as e:
        ChannelMap().resolve(names, "export_Pulses.csv")
    msg = str(e.value)
    assert (
        "export_Pulses.csv" in msg
        and "['FL Yellow']" in msg
        and "'FL Green'" in msg
        and "--channel-map" in msg
    )
    plan = ChannelMap().resolve(names, "export_Pulses.csv", fill_missing=True)
    assert plan.mask == (True, True, False, True, True, True)
    out = plan.apply(_matrix(6))
    assert not out[2].any() and out[CHANNELS.index("FL Red")].any()


def test_bad_tables_and_headers_are_explicit_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="'FL Green' is not a canonical channel"):
        ChannelMap({"FL Blue": "FL Green"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- FWS\n- SWS\n")
    with pytest.raises(DataError, match="bad.yaml: expected a mapping"):
        ChannelMap.from_yaml(bad)
    with pytest.raises(DataError, match="channel map file not found"):
        ChannelMap.from_yaml(tmp_path / "none.yaml")
    with pytest.raises(DataError, match=r"f\.csv: channel\(s\) \['FL Red', 'Fl Red'\] appear more than once"):
        ChannelMap().resolve(CEFAS + ["FL Red"], "f.csv")


def test_a_header_that_maps_no_channel_is_an_error_even_with_fill_missing() -> None:
    """A headerless profile's first line is numbers: zero-filling it would store a profile of zeros."""
    names = ["42.8", "118.4", "400.6", "291.1", "47.1", "216.6"]
    for fill_missing in (False, True):
        with pytest.raises(DataError, match=r"p\.csv: not one canonical channel .* header line missing"):
            ChannelMap().resolve(names, "p.csv", fill_missing=fill_missing)


def test_a_repeated_channel_name_is_an_error_only_if_it_is_used() -> None:
    plan = ChannelMap().resolve(BEADS + ["FWS L"], "beads")  # FWS L is not used: FWS wins
    m = _matrix(12)
    np.testing.assert_array_equal(plan.apply(m), m[[0, 1, 5, 6, 7, 8]].astype(np.float32))
    with pytest.raises(DataError, match=r"channel\(s\) \['FWS'\] appear more than once"):
        ChannelMap().resolve(BEADS + ["FWS"], "beads")


def test_a_file_mixing_utf8_and_cp1252_lines_keeps_its_utf8_lines() -> None:
    from xmodal.data.readers.delimited import decode_text

    raw = "image,class\nä.png,Chaetoceros_ä\n".encode() + "ö.png,Skeletonema_ö\n".encode("cp1252")
    text, encoding = decode_text(raw)
    assert text.splitlines() == ["image,class", "ä.png,Chaetoceros_ä", "ö.png,Skeletonema_ö"]
    assert encoding == "cp1252" and decode_text("ä\n".encode()) == ("ä\n", "utf-8")


def test_a_unit_suffix_is_ignored_when_matching_names() -> None:
    names = ["FWS (mV)", "SWS [mV]", "FL Yellow (mV)", "FL Orange(mV)", "FL Red [a.u.]", "Curvature (-)"]
    plan = ChannelMap().resolve(names, "units.csv")
    m = _matrix(6)
    np.testing.assert_array_equal(plan.apply(m), m.astype(np.float32))
    assert plan.describe()["mapping"]["FWS"] == "FWS (mV)"
    # user entries match with or without the unit, on either side
    renamed = ["FWS", "SWS", "FL Green [mV]", "FL Orange", "FL Red", "Curvature"]
    for entry in ("FL Green", "FL Green (mV)", "FL Green [mV]"):
        plan = ChannelMap({entry: "FL Yellow"}).resolve(renamed, "x")
        assert plan.describe()["mapping"]["FL Yellow"] == "FL Green [mV]"


def test_an_exact_name_wins_over_one_that_only_matches_without_its_brackets() -> None:
    """Brackets that tell two columns apart (sensitivities) are not a unit: the user picks one."""
    names = ["FWS", "SWS", "FL Yellow", "FL Orange", "FL Red (HS)", "FL Red (LS)", "Curvature"]
    with pytest.raises(DataError, match=r"\['FL Red \(HS\)', 'FL Red \(LS\)'\] .*--channel-map"):
        ChannelMap().resolve(names, "f.csv")
    plan = ChannelMap({"FL Red (LS)": "FL Red"}).resolve(names, "f.csv")
    assert plan.describe()["mapping"]["FL Red"] == "FL Red (LS)"
    plan = ChannelMap().resolve(["FL Red (mV)", "FL Red", *names[:4], "Curvature"], "f.csv")
    assert plan.describe()["mapping"]["FL Red"] == "FL Red"  # the exact name, not the one with a unit


def test_a_commented_header_line_loses_its_hash() -> None:
    from xmodal.data.readers.delimited import Dialect, header_names

    comma = Dialect(",", ".")
    assert header_names("# FWS,SWS", comma) == ["FWS", "SWS"]  # np.savetxt(..., header=...)
    assert header_names('#"FWS","SWS"', comma) == ["FWS", "SWS"]
    assert header_names("FWS,#SWS", comma) == ["FWS", "#SWS"]  # only the line's start is a comment
