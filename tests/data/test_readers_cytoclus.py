"""CytoClus exports: the real Cefas and ULCO files, and minimally corrupted copies of them."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from xmodal.data.quarantine import DataError
from xmodal.data.readers import cytoclus


def test_cefas_export_gives_817_particles_of_6_channels_4_with_images(
    rd: SimpleNamespace, cefas_ingested, realdata: Path
) -> None:
    report, rows = cefas_ingested
    assert (report.seen, report.ingested, report.quarantined) == (817, 817, 0)
    listmode = rd.cefas_prefix(realdata).with_name(rd.cefas_prefix(realdata).name + "_Listmode.csv")
    with open(listmode, encoding="utf-8-sig") as f:
        sample_length = {int(r["Particle ID"]): int(r["Sample Length"]) for r in csv.DictReader(f)}
    assert len(sample_length) == 817
    lengths = []
    for pid, n in sample_length.items():
        row = rows[f"Pond_NA_2023-05-24_09h23_All_Imaged_Particles:{pid}"]
        assert row["profile_length"] == n and len(row["profile"]) == 6 * n
        assert row["channel_mask"] == [True] * 6 and row["label"] is None
        lengths.append(n)
    assert (min(lengths), max(lengths)) == (12, 516)
    imaged = {int(pid.rsplit(":", 1)[1]) for pid, r in rows.items() if r["has_image"]}
    assert imaged == rd.CEFAS_IMAGED
    assert report.domains["Pond_NA_2023-05-24_09h23_All_Imaged_Particles"].channels[0]["mapping"] == {
        "FWS": "FWS", "SWS": "Sidewards Scatter", "FL Yellow": "Fl Yellow",
        "FL Orange": "Fl Orange", "FL Red": "Fl Red", "Curvature": "Curvature",
    }  # fmt: skip


def test_cefas_pulses_and_images_round_trip_exactly(
    rd: SimpleNamespace, cefas_ingested, realdata: Path
) -> None:
    _, rows = cefas_ingested
    prefix = rd.cefas_prefix(realdata)
    text = rd.pulse_text(Path(f"{prefix}_Pulses.csv"))
    for pid in (63, 88, 175871, 73362, 1700):  # imaged ones, the longest, a shortest
        stored = rd.profile(rows[f"Pond_NA_2023-05-24_09h23_All_Imaged_Particles:{pid}"])
        np.testing.assert_array_equal(stored, rd.as_float32(text[pid]))
    for pid in rd.CEFAS_IMAGED:
        row = rows[f"Pond_NA_2023-05-24_09h23_All_Imaged_Particles:{pid}"]
        crop = Path(f"{prefix}_Images") / f"Pond_NA 2023-05-24 09h23_Cropped_{pid}.jpg"
        assert row["image"] == crop.read_bytes()
        w, h = Image.open(crop).size
        assert (row["image_height"], row["image_width"]) == (h, w)


def test_ulco_malformed_rows_and_failed_crop_are_quarantined(
    rd: SimpleNamespace, realdata: Path, tmp_path: Path
) -> None:
    report, rows = rd.run(rd.ulco_prefix(realdata).parent, tmp_path)
    src = "R4_photos_flr16_2uls_10min_2022-09-14_12h28"
    assert (report.seen, report.ingested, report.quarantined) == (9, 6, 3)
    assert report.reasons == {"malformed_row": 2, "empty_image": 1}
    q = rd.quarantined(tmp_path)
    assert {k: e["reason"] for k, e in q.items()} == {
        f"{src}:4206": "malformed_row",  # 85 fields: 10104's row spliced into it
        f"{src}:10104": "malformed_row",  # 77 fields, Sample Length 1502 for a 72-sample pulse
        f"{src}:29": "empty_image",  # 1280x400 crop with no object
    }
    assert "77 fields" in q[f"{src}:10104"]["message"] and "'1502'" in q[f"{src}:10104"]["message"]
    assert "72 samples" in q[f"{src}:10104"]["message"]
    assert q[f"{src}:29"]["file"].endswith("_Cropped_29.jpg")
    assert sorted(rows) == sorted(f"{src}:{i}" for i in (0, 1, 2, 3, 3269, 3543))
    assert [rows[f"{src}:{i}"]["has_image"] for i in (0, 3269, 3543)] == [False, True, True]
    # particle ID 0 is a real particle; ';' separators and decimal commas parse exactly
    text = rd.pulse_text(Path(f"{rd.ulco_prefix(realdata)}_Pulses.csv"))
    assert rows[f"{src}:0"]["profile_length"] == 20
    for pid in (0, 1, 3543):
        np.testing.assert_array_equal(rd.profile(rows[f"{src}:{pid}"]), rd.as_float32(text[pid]))
    assert rd.profile(rows[f"{src}:0"])[0, 0] == np.float32(23.82)


def _pulse_lines(lines: list[bytes], pid: int) -> list[int]:
    return [i for i, ln in enumerate(lines) if ln.split(b",", 1)[0] == str(pid).encode()]


@pytest.fixture
def cefas_copy(rd: SimpleNamespace, realdata: Path, tmp_path: Path) -> Path:
    return rd.copy_export(rd.cefas_prefix(realdata), tmp_path / "src")


def _name(pid: int) -> str:
    return f"Pond_NA_2023-05-24_09h23_All_Imaged_Particles:{pid}"


def test_truncated_pulse_is_length_mismatch(rd: SimpleNamespace, cefas_copy: Path, tmp_path: Path) -> None:
    pulses = Path(f"{cefas_copy}_Pulses.csv")
    rd.edit_lines(pulses, lambda ls: ls[: _pulse_lines(ls, 88)[-1]] + ls[_pulse_lines(ls, 88)[-1] + 1 :])
    report, rows = rd.run(cefas_copy.parent, tmp_path / "out")
    assert (report.ingested, report.reasons) == (816, {"length_mismatch": 1})
    assert "57 samples" in rd.quarantined(tmp_path / "out")[_name(88)]["message"]
    assert _name(88) not in rows and _name(63) in rows


def test_non_finite_and_non_numeric_pulse_values(
    rd: SimpleNamespace, cefas_copy: Path, tmp_path: Path
) -> None:
    pulses = Path(f"{cefas_copy}_Pulses.csv")

    def corrupt(ls: list[bytes]) -> list[bytes]:
        i, j = _pulse_lines(ls, 63)[3], _pulse_lines(ls, 151)[5]
        ls[i] = b"63,128.8,NaN,2.094,0.1875,19.94,0.2228"
        ls[j] = b"151,oops,1,1,1,1,1"
        return ls

    rd.edit_lines(pulses, corrupt)
    report, _ = rd.run(cefas_copy.parent, tmp_path / "out")
    q = rd.quarantined(tmp_path / "out")
    assert report.reasons == {"non_finite": 1, "malformed_row": 1} and report.ingested == 815
    assert q[_name(63)]["reason"] == "non_finite" and "SWS" in q[_name(63)]["message"]
    assert q[_name(151)]["reason"] == "malformed_row" and "'oops'" in q[_name(151)]["message"]


def test_repeated_and_unmatched_ids(rd: SimpleNamespace, cefas_copy: Path, tmp_path: Path) -> None:
    pulses, listmode = Path(f"{cefas_copy}_Pulses.csv"), Path(f"{cefas_copy}_Listmode.csv")
    # particle 181 appears twice in the pulses; listmode row of 301 removed, of 341 doubled;
    # a crop without particle
    rd.edit_lines(
        pulses, lambda ls: ls[:-1] + [ls[i] for i in _pulse_lines(ls, 181)] + [b"0,0,0,0,0,0,0"] * 2 + [b""]
    )
    rd.edit_lines(listmode, lambda ls: [ln for ln in ls if not ln.startswith(b"301,")])
    rd.edit_lines(listmode, lambda ls: ls + [ln for ln in ls if ln.startswith(b"341,")])
    images = Path(f"{cefas_copy}_Images")
    (images / "Pond_NA 2023-05-24 09h23_Cropped_999999.jpg").write_bytes(
        (images / "Pond_NA 2023-05-24 09h23_Cropped_63.jpg").read_bytes()
    )
    report, rows = rd.run(cefas_copy.parent, tmp_path / "out")
    q = rd.quarantined(tmp_path / "out")
    assert report.seen == 820 and report.ingested == 815  # the extra listmode row is a particle seen
    assert report.reasons == {"duplicate_id": 3, "unmatched_id": 2}
    assert q[_name(181)]["reason"] == "duplicate_id" and _name(181) in rows  # the first pulse keeps the ID
    assert q[_name(341)]["reason"] == "duplicate_id" and _name(341) not in rows  # which row? ambiguous
    assert q[_name(301)]["reason"] == "unmatched_id" and "no listmode row" in q[_name(301)]["message"]
    assert q[_name(999999)]["reason"] == "unmatched_id"


def test_unreadable_and_oversized_crops(rd: SimpleNamespace, cefas_copy: Path, tmp_path: Path) -> None:
    images = Path(f"{cefas_copy}_Images")
    crop88 = images / "Pond_NA 2023-05-24 09h23_Cropped_88.jpg"
    crop88.write_bytes(crop88.read_bytes()[:2000])  # truncated JPEG
    crop118 = images / "Pond_NA 2023-05-24 09h23_Cropped_118.jpg"
    crop118.write_bytes(rd.jpeg_with_size(crop118.read_bytes(), 60000, 60000))  # 3.6 Gpx header
    report, rows = rd.run(cefas_copy.parent, tmp_path / "out")
    q = rd.quarantined(tmp_path / "out")
    assert report.reasons == {"unreadable_image": 1, "image_too_large": 1}
    assert q[_name(88)]["reason"] == "unreadable_image" and q[_name(118)]["reason"] == "image_too_large"
    assert rows[_name(63)]["has_image"] and rows[_name(151)]["has_image"]
    # a pixel limit below 80x80 rejects every crop from its header
    report, _ = rd.run(cefas_copy.parent, tmp_path / "out2", max_pixels=80 * 80 - 1)
    assert report.reasons == {"image_too_large": 4}


def test_block_boundaries_do_not_change_the_result(
    rd: SimpleNamespace, realdata: Path, tmp_path: Path, cefas_ingested, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pulses are streamed in blocks; tiny blocks split particles and separator pairs everywhere."""
    monkeypatch.setattr(cytoclus, "BLOCK_BYTES", 5000)
    _, rows = rd.run(rd.cefas_prefix(realdata).parent, tmp_path / "cefas")
    _, reference = cefas_ingested
    assert rows.keys() == reference.keys()
    for pid, row in rows.items():
        assert row == reference[pid], pid
    report, rows = rd.run(rd.ulco_prefix(realdata).parent, tmp_path / "ulco")
    assert (report.ingested, report.reasons) == (6, {"malformed_row": 2, "empty_image": 1})
    assert rows["R4_photos_flr16_2uls_10min_2022-09-14_12h28:0"]["profile_length"] == 20


def test_particle_zero_between_other_particles(rd: SimpleNamespace, cefas_copy: Path, tmp_path: Path) -> None:
    """ID 0 rows share the separator's ID: particle 0 in the middle of the file is still found."""
    pulses, listmode = Path(f"{cefas_copy}_Pulses.csv"), Path(f"{cefas_copy}_Listmode.csv")
    original = rd.as_float32(rd.pulse_text(pulses)[63])
    rd.edit_lines(pulses, _move)
    rd.edit_lines(listmode, lambda ls: [b"0" + ln[2:] if ln.startswith(b"63,") else ln for ln in ls])
    (Path(f"{cefas_copy}_Images") / "Pond_NA 2023-05-24 09h23_Cropped_63.jpg").unlink()
    report, rows = rd.run(cefas_copy.parent, tmp_path / "out")
    assert report.quarantined == 0 and report.ingested == 817
    np.testing.assert_array_equal(rd.profile(rows[_name(0)]), original)


def _move(ls: list[bytes]) -> list[bytes]:
    """Rename particle 63 (first in the file) to ID 0 and move it after particle 118."""
    idx = _pulse_lines(ls, 63)
    block = [b"0" + ls[i][2:] for i in idx] + [b"0,0,0,0,0,0,0"] * 2
    rest = [ln for i, ln in enumerate(ls) if i not in idx]
    del rest[1:3]  # 63's separator pair, right after the header
    k = _pulse_lines(rest, 118)[-1] + 3
    return rest[:k] + block + rest[k:]


def test_garbled_id_on_a_particles_first_pulse_line_is_charged_to_that_particle(
    rd: SimpleNamespace, cefas_copy: Path, tmp_path: Path
) -> None:
    """The good line above the first line of 88 is a separator row (ID 0): 88 is the culprit, not a
    'particle 0' (nor the particle above the separators)."""
    pulses = Path(f"{cefas_copy}_Pulses.csv")

    def garble(ls: list[bytes]) -> list[bytes]:
        i = _pulse_lines(ls, 88)[0]
        assert ls[i - 1] == b"0,0,0,0,0,0,0"
        ls[i] = b"?" + ls[i][2:]
        return ls

    rd.edit_lines(pulses, garble)
    report, rows = rd.run(cefas_copy.parent, tmp_path / "out")
    assert (report.seen, report.ingested, report.reasons) == (817, 816, {"malformed_row": 1})
    assert "field 1 ('?') is not a number" in rd.quarantined(tmp_path / "out")[_name(88)]["message"]


def test_trailing_separators_and_quoted_header_names_read_as_the_plain_export(
    rd: SimpleNamespace, cefas_copy: Path, tmp_path: Path, cefas_ingested
) -> None:
    """Every line ends with ',' and the header names are quoted (R's write.csv): same particles."""

    def edit(ls: list[bytes]) -> list[bytes]:
        bom, names = ls[0][:3], ls[0][3:].split(b",")
        assert bom == b"\xef\xbb\xbf"
        ls[0] = bom + b",".join(b'"' + n + b'"' for n in names)
        return [ln + b"," if ln else ln for ln in ls]

    for suffix in ("_Pulses.csv", "_Listmode.csv"):
        rd.edit_lines(Path(f"{cefas_copy}{suffix}"), edit)
    assert Path(f"{cefas_copy}_Listmode.csv").read_bytes().startswith(b'\xef\xbb\xbf"Particle ID","Sample')
    report, rows = rd.run(cefas_copy.parent, tmp_path / "out")
    _, reference = cefas_ingested
    assert report.quarantined == 0 and rows.keys() == reference.keys()
    for pid, row in rows.items():
        assert row == reference[pid], pid


def test_an_empty_last_cell_in_the_first_listmode_row_is_not_a_trailing_separator(
    rd: SimpleNamespace, cefas_copy: Path, tmp_path: Path, cefas_ingested
) -> None:
    """The first particle's last value is missing (its line ends with ','): still as many fields as
    the header, so not a separator closing every line; every particle is read, the others unchanged."""

    def edit(ls: list[bytes]) -> list[bytes]:
        ls[1] = ls[1].rsplit(b",", 1)[0] + b","
        return ls

    listmode = Path(f"{cefas_copy}_Listmode.csv")
    rd.edit_lines(listmode, edit)
    first = listmode.read_bytes().split(b"\r\n")[1]
    report, rows = rd.run(cefas_copy.parent, tmp_path / "out")
    assert (report.seen, report.ingested, report.reasons) == (817, 817, {})
    _, reference = cefas_ingested
    edited = f"{cefas_copy.name.replace(' ', '_')}:{int(first.split(b',', 1)[0])}"
    assert rows.keys() == reference.keys() and edited in rows
    assert sum(row != reference[pid] for pid, row in rows.items()) <= 1


def test_ulco_with_a_trailing_semicolon_keeps_its_outcomes(
    rd: SimpleNamespace, realdata: Path, tmp_path: Path
) -> None:
    """';' separators, decimal commas and a ';' closing every line, header included."""
    src = rd.copy_export(rd.ulco_prefix(realdata), tmp_path / "src")
    for suffix in ("_Pulses.csv", "_Listmode.csv"):
        rd.edit_lines(Path(f"{src}{suffix}"), lambda ls: [ln + b";" if ln else ln for ln in ls])
    report, rows = rd.run(src.parent, tmp_path / "out")
    assert (report.ingested, report.reasons) == (6, {"malformed_row": 2, "empty_image": 1})
    text = rd.pulse_text(Path(f"{rd.ulco_prefix(realdata)}_Pulses.csv"))
    for pid in (0, 1, 3543):
        row = rows[f"R4_photos_flr16_2uls_10min_2022-09-14_12h28:{pid}"]
        np.testing.assert_array_equal(rd.profile(row), rd.as_float32(text[pid]))


def test_cr_only_line_endings_are_named(rd: SimpleNamespace, realdata: Path, tmp_path: Path) -> None:
    src = rd.copy_export(rd.ulco_prefix(realdata), tmp_path / "src")
    pulses = Path(f"{src}_Pulses.csv")
    pulses.write_bytes(pulses.read_bytes().replace(b"\r\n", b"\r"))
    with pytest.raises(DataError, match=r"_Pulses\.csv: CR-only line endings"):
        rd.run(src.parent, tmp_path / "out")
