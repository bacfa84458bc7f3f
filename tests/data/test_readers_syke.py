"""SYKE layout: the real Cefas/ULCO particles in that layout, and corrupted copies of them."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw

from xmodal.data.quarantine import DataError

LAYOUT = "derived/syke_layout"


@pytest.fixture
def cefas_layout(rd: SimpleNamespace, realdata: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "LAB"
    shutil.copytree(realdata / rd.CEFAS / LAYOUT, dest)
    dest.chmod(0o755)
    for p in dest.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dest


def test_cefas_layout_round_trips_and_matches_the_cytoclus_pulses(
    rd: SimpleNamespace, realdata: Path, tmp_path: Path
) -> None:
    src = realdata / rd.CEFAS / LAYOUT
    report, rows = rd.run(src, tmp_path)
    assert (report.seen, report.ingested, list(report.domains)) == (4, 4, ["syke_layout"])
    pulses = rd.pulse_text(Path(f"{rd.cefas_prefix(realdata)}_Pulses.csv"))
    for pid in rd.CEFAS_IMAGED:
        row = rows[f"syke_layout:{pid}"]
        assert row["label"] is None  # the 'unlabelled' placeholder
        assert row["image"] == (src / "images" / f"cefas_pond_{pid}.jpg").read_bytes()
        np.testing.assert_array_equal(rd.profile(row), rd.as_float32(pulses[pid]))  # "13.0" vs "13"


def test_header_crop_stores_the_cropped_pixels(
    rd: SimpleNamespace, cefas_layout: Path, tmp_path: Path
) -> None:
    _, rows = rd.run(cefas_layout, tmp_path / "out", crop_header_px=25)
    row = rows["LAB:88"]
    original = np.asarray(Image.open(cefas_layout / "images" / "cefas_pond_88.jpg"))
    assert (row["image_height"], row["image_width"]) == (160 - 25, 160)
    stored = Image.open(io.BytesIO(row["image"]))
    assert stored.format == "PNG"
    np.testing.assert_array_equal(np.asarray(stored), original[25:])
    report, _ = rd.run(cefas_layout, tmp_path / "out2", crop_header_px=100)  # 63 is 80 px high
    entry = rd.quarantined(tmp_path / "out2")["LAB:63"]
    assert entry["reason"] == "empty_image" and "100-px header crop" in entry["message"]
    # cutting 100 rows off real crops (which have no header bar) also leaves strips with no object
    assert set(report.reasons) == {"empty_image"} and report.seen == 4


def test_root_with_several_layouts_labels_and_profile_column_order(
    rd: SimpleNamespace, realdata: Path, cefas_layout: Path, tmp_path: Path
) -> None:
    root = cefas_layout.parent
    shutil.copytree(realdata / rd.ULCO / LAYOUT, root / "SEA")
    ann = cefas_layout / "annotations.csv"
    ann.write_text(ann.read_text().replace(",unlabelled,63", ",diatom,63").replace(",unlabelled,88", ",,88"))
    prof = cefas_layout / "profiles" / "cefas_pond_151.csv"
    lines = [ln.split(",") for ln in prof.read_text().splitlines()]
    order = [5, 0, 3, 1, 4, 2]  # shuffle columns, rename one: channels are found by name
    lines[0][1] = "SWS"
    prof.write_text("\n".join(",".join(ln[i] for i in order) for ln in lines) + "\n")
    report, rows = rd.run(root, tmp_path / "out")
    assert sorted(report.domains) == ["LAB", "SEA"]
    assert (report.domains["LAB"].ingested, report.domains["SEA"].ingested) == (4, 4)
    assert report.domains["SEA"].reasons == {"empty_image": 1}
    assert [rows[f"LAB:{i}"]["label"] for i in (63, 88, 118)] == ["diatom", None, None]
    pulses = rd.pulse_text(Path(f"{rd.cefas_prefix(realdata)}_Pulses.csv"))
    np.testing.assert_array_equal(rd.profile(rows["LAB:151"]), rd.as_float32(pulses[151]))
    assert {r["domain"] for k, r in rows.items() if k.startswith("SEA:")} == {"SEA"}


def test_every_row_problem_gets_its_reason(rd: SimpleNamespace, cefas_layout: Path, tmp_path: Path) -> None:
    images, profiles = cefas_layout / "images", cefas_layout / "profiles"
    (images / "trunc.jpg").write_bytes((images / "cefas_pond_88.jpg").read_bytes()[:1500])
    bomb = rd.jpeg_with_size((images / "cefas_pond_63.jpg").read_bytes(), 50000, 50000)
    (images / "bomb.jpg").write_bytes(bomb)
    good = (profiles / "cefas_pond_63.csv").read_text().splitlines()
    (profiles / "nan.csv").write_text("\n".join(good[:3] + ["13.0,3.5,nan,0.0,2.167,0.39"] + good[4:]) + "\n")
    (profiles / "short.csv").write_text("\n".join(good[:5] + ["13.0,3.5,0.0,2.167,0.39"] + good[6:]) + "\n")
    (profiles / "empty.csv").write_text(good[0] + "\n")
    outside = tmp_path / "outside.csv"
    outside.write_text("\n".join(good) + "\n")
    rows = [
        "images/cefas_pond_63.jpg,profiles/cefas_pond_63.csv,a,ok_1",
        f"{images / 'cefas_pond_88.jpg'},{profiles / 'cefas_pond_88.csv'},a,ok_absolute_inside",
        "images/cefas_pond_118.jpg,,a,ok_image_only",
        ",profiles/cefas_pond_118.csv,a,ok_profile_only",
        "images/cefas_pond_63.jpg,../outside.csv,a,escape",
        f"images/cefas_pond_63.jpg,{outside},a,absolute_outside",
        "images/cefas_pond_63.jpg,profiles/none.csv,a,missing",
        "images/cefas_pond_63.jpg,profiles/cefas_pond_63.csv,a,ok_1",
        "images/cefas_pond_63.jpg,profiles/cefas_pond_63.csv,a,ok_2,extra",
        "images/trunc.jpg,profiles/cefas_pond_63.csv,a,trunc",
        "images/bomb.jpg,profiles/cefas_pond_63.csv,a,bomb",
        "images/cefas_pond_63.jpg,profiles/nan.csv,a,nan",
        "images/cefas_pond_63.jpg,profiles/short.csv,a,short",
        "images/cefas_pond_63.jpg,profiles/empty.csv,a,empty",
    ]
    (cefas_layout / "annotations.csv").write_text(
        "image,profile,class,particle_id\n" + "\n".join(rows) + "\n"
    )
    report, out_rows = rd.run(cefas_layout, tmp_path / "out")
    reasons = {k: e["reason"] for k, e in rd.quarantined(tmp_path / "out").items()}
    assert reasons == {
        "LAB:escape": "path_escape", "LAB:absolute_outside": "path_escape", "LAB:missing": "missing_file",
        "LAB:ok_1": "duplicate_id", "line 10": "malformed_row", "LAB:trunc": "unreadable_image",
        "LAB:bomb": "image_too_large", "LAB:nan": "non_finite", "LAB:short": "malformed_row",
        "LAB:empty": "malformed_row",
    }  # fmt: skip
    assert (report.seen, report.ingested, report.quarantined) == (14, 4, 10)
    assert sorted(out_rows) == [
        "LAB:ok_1",
        "LAB:ok_absolute_inside",
        "LAB:ok_image_only",
        "LAB:ok_profile_only",
    ]
    assert (
        not out_rows["LAB:ok_image_only"]["has_profile"] and not out_rows["LAB:ok_profile_only"]["has_image"]
    )
    assert "line 6: 5 fields, expected 6" in rd.quarantined(tmp_path / "out")["LAB:short"]["message"]


def test_annotations_without_required_columns_is_an_error(cefas_layout: Path, tmp_path: Path) -> None:
    from xmodal.data.ingest import ingest

    (cefas_layout / "annotations.csv").write_text("img,profile,class\na.png,b.csv,x\n")
    with pytest.raises(DataError, match=r"annotations\.csv: header .* lacks column\(s\) \['image'\]"):
        ingest(cefas_layout, tmp_path / "out", quiet=True)


CHANNEL_HEADER = "FWS,SWS,FL Yellow,FL Orange,FL Red,Curvature"
VALUES = np.array([[10, 20, 3, 4, 50, 0.1], [30, 40, 5, 6, 70, -0.2]])


def particle_image(size: tuple[int, int] = (40, 30)) -> Image.Image:
    """A dark disk on a bright background: passes the empty-crop check."""
    w, h = size
    im = Image.new("L", size, 200)
    ImageDraw.Draw(im).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=40)
    return im


def write_layout(dest: Path, profiles: list[bytes], labels: list[str] | None = None, sep: str = "/") -> Path:
    """A SYKE layout of one PNG crop and one profile per particle; annotations.csv paths use ``sep``."""
    (dest / "images").mkdir(parents=True)
    (dest / "profiles").mkdir()
    lines = ["image,profile,class"]
    for i, data in enumerate(profiles):
        particle_image().save(dest / "images" / f"{i}.png")
        (dest / "profiles" / f"{i}.csv").write_bytes(data)
        lines.append(f"images{sep}{i}.png,profiles{sep}{i}.csv,{labels[i] if labels else 'A'}")
    (dest / "annotations.csv").write_text("\n".join(lines) + "\n")
    return dest


def savetxt_profile() -> str:
    """np.savetxt's output: its header is a comment line, ``# FWS,SWS,...``."""
    buf = io.StringIO()
    np.savetxt(buf, VALUES, delimiter=",", header=CHANNEL_HEADER)
    return buf.getvalue()


def plain_profile() -> bytes:
    return (CHANNEL_HEADER + "\n" + "\n".join(",".join(f"{v:g}" for v in r) for r in VALUES) + "\n").encode()


def test_cp1252_annotations_keep_their_labels_apart_and_are_noted(
    rd: SimpleNamespace, tmp_path: Path
) -> None:
    labels = ["Skeletonema_ä", "Skeletonema_ö"]
    layout = write_layout(tmp_path / "LAB", [plain_profile()] * 2, labels)
    ann = layout / "annotations.csv"
    ann.write_bytes(ann.read_text().encode("cp1252"))  # Excel's "CSV (Comma delimited)" on Windows
    report, rows = rd.run(layout, tmp_path / "out", crop_header_px=0)
    assert [rows[f"LAB:images/{i}.png"]["label"] for i in (0, 1)] == labels
    (note,) = report.domains["LAB"].notes
    assert "annotations.csv is not UTF-8; read as cp1252" in note and note in report.summary()


@pytest.mark.parametrize(
    "text",
    [
        "FWS,SWS,FL Yellow,FL Orange,FL Red,Curvature,\n10,20,3,4,50,0.1,\n30,40,5,6,70,-0.2,\n",
        "FWS;SWS;FL Yellow;FL Orange;FL Red;Curvature;\r\n10;20;3;4;50;0,1;\r\n30;40;5;6;70;-0,2;\r\n",
        '"FWS","SWS","FL Yellow","FL Orange","FL Red","Curvature"\n10,20,3,4,50,0.1\n30,40,5,6,70,-0.2\n',
        "FWS,SWS,FL Yellow,FL Orange,FL Red,Curvature\r10,20,3,4,50,0.1\r30,40,5,6,70,-0.2\r",
        savetxt_profile(),
        "FWS (mV),SWS [mV],FL Yellow (mV),FL Orange(mV),FL Red [a.u.],Curvature (-)\n10,20,3,4,50,0.1\n"
        "30,40,5,6,70,-0.2\n",
        "FWS,SWS,FL Yellow,FL Orange,FL Red,Curvature\n10,20,3,4,50,0.1,\n30,40,5,6,70,-0.2,\n",
        "FWS,SWS,FL Yellow,FL Orange,FL Red,Curvature\nmV,mV,mV,mV,mV,a.u.\n10,20,3,4,50,0.1\n30,40,5,6,70,-0.2\n",
        "FWS;SWS;FL Yellow;FL Orange;FL Red;Curvature\r\n(mV);[mV];(mV);(mV);(mV);\r\n10;20;3;4;50;0,1\r\n"
        "30;40;5;6;70;-0,2\r\n",
    ],
    ids=[
        "trailing-comma",
        "trailing-semicolon-decimal-comma",
        "quoted-header",
        "cr-only",
        "np-savetxt",
        "units",
        "trailing-comma-on-data-lines-only",
        "units-line",
        "units-line-bracketed-semicolon",
    ],
)
def test_profile_csv_variants_read_the_same_values(rd: SimpleNamespace, tmp_path: Path, text: str) -> None:
    layout = write_layout(tmp_path / "LAB", [text.encode()])
    report, rows = rd.run(layout, tmp_path / "out", crop_header_px=0)
    assert report.quarantined == 0
    np.testing.assert_array_equal(rd.profile(rows["LAB:images/0.png"]), VALUES.T.astype(np.float32))


def test_a_units_line_is_noted_once_and_other_units_or_bad_lines_are_named(
    rd: SimpleNamespace, tmp_path: Path
) -> None:
    head = CHANNEL_HEADER + "\n"
    mv = head + "mV,mV,mV,mV,mV,a.u.\n" + plain_profile().decode().split("\n", 1)[1]
    volts = head + "V,V,V,V,V,a.u.\n10,20,3,4,50,0.1\n"
    bad_line = head + "mV,mV,mV,mV,mV,a.u.\n10,20,3,4,50,0.1\n10,20,x,4,50,0.1\n"
    missing = head + "NA,NA,NA,NA,NA,NA\n10,20,3,4,50,0.1\n"  # missing values, not units
    layout = write_layout(tmp_path / "LAB", [t.encode() for t in (mv, mv, volts, bad_line, missing)])
    report, rows = rd.run(layout, tmp_path / "out", crop_header_px=0)
    for i in (0, 1):
        np.testing.assert_array_equal(rd.profile(rows[f"LAB:images/{i}.png"]), VALUES.T.astype(np.float32))
    units_notes = [n for n in report.domains["LAB"].notes if "line of units" in n]
    assert units_notes == [
        "LAB: profile files have a line of units under the header (mV, mV, mV, mV, mV, a.u.); "
        "it was skipped and the values read as mV"
    ]
    entries = rd.quarantined(tmp_path / "out")
    assert (
        "line 2 gives the units ['V', 'V', 'V', 'V', 'V', 'a.u.']" in entries["LAB:images/2.png"]["message"]
    )
    assert entries["LAB:images/3.png"]["message"].startswith("line 4: ")  # numbered as in the file
    assert entries["LAB:images/4.png"]["message"].startswith("line 2: ")
    assert report.quarantined == 3


@pytest.mark.parametrize("fill_missing", [False, True])
def test_a_headerless_profile_quarantines_its_particle_only(
    rd: SimpleNamespace, tmp_path: Path, fill_missing: bool
) -> None:
    headerless = plain_profile().split(b"\n", 1)[1]  # np.savetxt without a header
    layout = write_layout(tmp_path / "LAB", [plain_profile(), headerless, plain_profile()])
    report, rows = rd.run(layout, tmp_path / "out", crop_header_px=0, fill_missing=fill_missing)
    assert (report.seen, report.ingested, report.reasons) == (3, 2, {"malformed_row": 1})
    entry = rd.quarantined(tmp_path / "out")["LAB:images/1.png"]
    assert entry["file"].endswith("profiles/1.csv") and "header line missing or damaged" in entry["message"]
    assert "['10', '20', '3', '4', '50', '0.1']" in entry["message"]  # what the 'header' holds


def test_source_name_of_dot_and_of_a_folder_with_a_space(
    rd: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = write_layout(tmp_path / "LAB 2024", [plain_profile()])
    monkeypatch.chdir(layout)
    report, rows = rd.run(Path("."), tmp_path / "out", crop_header_px=0)
    assert list(report.domains) == ["LAB_2024"] and list(rows) == ["LAB_2024:images/0.png"]
    assert rows["LAB_2024:images/0.png"]["source"] == "LAB_2024"
    report, rows = rd.run(
        write_layout(tmp_path / "Utö", [plain_profile()]), tmp_path / "out2", crop_header_px=0
    )
    assert list(report.domains) == ["Uto"] and list(rows) == ["Uto:images/0.png"]  # the SYKE station


def test_windows_backslash_paths_are_read_and_still_cannot_escape(
    rd: SimpleNamespace, tmp_path: Path
) -> None:
    layout = write_layout(tmp_path / "LAB", [plain_profile()] * 2, sep="\\")
    (tmp_path / "outside.csv").write_bytes(plain_profile())
    with open(layout / "annotations.csv", "a") as f:
        f.write(",..\\outside.csv,A\n,profiles\\..\\..\\etc\\passwd,A\n")
    report, rows = rd.run(layout, tmp_path / "out", crop_header_px=0)
    assert sorted(rows) == ["LAB:images\\0.png", "LAB:images\\1.png"]
    assert rows["LAB:images\\1.png"]["has_image"] and rows["LAB:images\\1.png"]["has_profile"]
    assert report.reasons == {"path_escape": 2}


def test_a_profile_lacking_a_channel_stops_the_ingest_naming_file_and_channel(
    rd: SimpleNamespace, tmp_path: Path
) -> None:
    """An instrument without a channel needs a decision (--channel-map or --fill-missing), as in the
    other readers: an error, not every particle quarantined."""
    no_red = CHANNEL_HEADER.replace(",FL Red", "") + "\n10,20,3,4,0.1\n"
    layout = write_layout(tmp_path / "LAB", [plain_profile(), no_red.encode()])
    with pytest.raises(
        DataError, match=r"profiles/1\.csv: .*no column for canonical channel\(s\) \['FL Red'\]"
    ):
        rd.run(layout, tmp_path / "out", crop_header_px=0)
    report, rows = rd.run(layout, tmp_path / "out2", crop_header_px=0, fill_missing=True)
    assert (report.ingested, report.quarantined) == (2, 0)
    assert rows["LAB:images/1.png"]["channel_mask"] == [True, True, True, True, False, True]


def test_channel_names_the_table_does_not_know_stop_the_ingest(rd: SimpleNamespace, tmp_path: Path) -> None:
    """Unknown names are an instrument to map (--channel-map), not a damaged header: an error naming
    the file, not every particle quarantined."""
    unknown = b"Chan A,Chan B,Chan C\n1,2,3\n"
    layout = write_layout(tmp_path / "LAB", [unknown, unknown])
    for fill_missing in (False, True):
        with pytest.raises(DataError, match=r"profiles/0\.csv: .*no column for canonical channel"):
            rd.run(layout, tmp_path / f"out{fill_missing}", crop_header_px=0, fill_missing=fill_missing)


def numbered_profile() -> bytes:
    """pandas' ``DataFrame(values).to_csv(index=False)``: the header is the column numbers."""
    return plain_profile().replace(CHANNEL_HEADER.encode(), b"0,1,2,3,4,5", 1)


def test_numbered_columns_in_every_profile_say_how_to_map_them(rd: SimpleNamespace, tmp_path: Path) -> None:
    layout = write_layout(tmp_path / "LAB", [numbered_profile()] * 3)
    report, rows = rd.run(layout, tmp_path / "out", crop_header_px=0)
    assert (report.ingested, report.reasons) == (0, {"malformed_row": 3})
    entry = rd.quarantined(tmp_path / "out")["LAB:images/1.png"]
    assert entry["file"].endswith("profiles/1.csv") and "--channel-map" in entry["message"]
    (note,) = report.domains["LAB"].notes
    assert (
        "none of its 3 particle(s)" in note
        and "--channel-map" in note
        and f"note: {note}" in report.summary()
    )
    saved = json.loads((tmp_path / "out" / "ingest_report.json").read_text())
    assert saved["domains"]["LAB"]["notes"] == [note]
    # the YAML the message suggests, saved as a file, ingests every particle in the canonical order
    mapping = re.search(r"\{.*?\}", entry["message"]).group(0)
    assert mapping.startswith('{"0": FWS, "1": SWS, "2": FL Yellow') and mapping in note
    (tmp_path / "channels.yaml").write_text(mapping + "\n")
    report, rows = rd.run(layout, tmp_path / "out2", crop_header_px=0, channel_map=tmp_path / "channels.yaml")
    assert (report.ingested, report.quarantined) == (3, 0)
    np.testing.assert_array_equal(rd.profile(rows["LAB:images/2.png"]), VALUES.T.astype(np.float32))


def test_numbered_columns_in_some_profiles_quarantine_those_only(rd: SimpleNamespace, tmp_path: Path) -> None:
    layout = write_layout(tmp_path / "LAB", [plain_profile(), numbered_profile()])
    report, _ = rd.run(layout, tmp_path / "out", crop_header_px=0)
    assert (report.ingested, report.reasons, report.domains["LAB"].notes) == (1, {"malformed_row": 1}, [])
    assert '"0": FWS' in rd.quarantined(tmp_path / "out")["LAB:images/1.png"]["message"]


def test_a_headerless_profile_in_every_file_is_noted(rd: SimpleNamespace, tmp_path: Path) -> None:
    headerless = plain_profile().split(b"\n", 1)[1]
    report, _ = rd.run(write_layout(tmp_path / "LAB", [headerless] * 2), tmp_path / "out", crop_header_px=0)
    (note,) = report.domains["LAB"].notes
    assert "none of its 2 particle(s)" in note and "header line missing" in note


def write_annotations(layout: Path, header: str, rows: list[str]) -> None:
    (layout / "annotations.csv").write_text("\n".join([header, *rows]) + "\n")


@pytest.mark.parametrize("name", ["Class_name", "taxon name", "Label", "SPECIES-NAME", "categoryname"])
def test_a_class_column_under_another_name_is_read(rd: SimpleNamespace, tmp_path: Path, name: str) -> None:
    layout = write_layout(tmp_path / "LAB", [plain_profile()] * 2)
    write_annotations(
        layout,
        f"image,profile,{name}",
        ["images/0.png,profiles/0.csv,diatom", "images/1.png,profiles/1.csv,"],
    )
    report, rows = rd.run(layout, tmp_path / "out", crop_header_px=0)
    assert [rows[f"LAB:images/{i}.png"]["label"] for i in (0, 1)] == ["diatom", None]
    d = report.domains["LAB"]
    assert (d.notes, d.labelled, d.unlabelled) == ([], 1, 1)
    assert "LAB: 2 particles (1 labelled, 1 unlabelled)" in report.summary()
    saved = json.loads((tmp_path / "out" / "ingest_report.json").read_text())
    assert (saved["domains"]["LAB"]["labelled"], saved["domains"]["LAB"]["unlabelled"]) == (1, 1)


def test_no_class_column_is_noted(rd: SimpleNamespace, tmp_path: Path) -> None:
    layout = write_layout(tmp_path / "LAB", [plain_profile()] * 2)
    write_annotations(
        layout, "image,profile,Kind", ["images/0.png,profiles/0.csv,diatom", "images/1.png,profiles/1.csv,x"]
    )
    report, rows = rd.run(layout, tmp_path / "out", crop_header_px=0)
    assert {r["label"] for r in rows.values()} == {None}
    (note,) = report.domains["LAB"].notes
    assert "annotations.csv" in note and "no class column" in note and "['image', 'profile', 'Kind']" in note
    assert "class_name" in note and "taxon" in note and f"note: {note}" in report.summary()
    assert (report.domains["LAB"].labelled, report.domains["LAB"].unlabelled) == (0, 2)


def test_na_like_class_cells_are_unlabelled_and_counted(rd: SimpleNamespace, tmp_path: Path) -> None:
    cells = ["NA", " n/a ", "nan", "NaN", "None", "NULL", "diatom", "", "unlabelled"]
    layout = write_layout(tmp_path / "LAB", [plain_profile()] * len(cells), labels=cells)
    report, rows = rd.run(layout, tmp_path / "out", crop_header_px=0)
    labels = [rows[f"LAB:images/{i}.png"]["label"] for i in range(len(cells))]
    assert labels == [None] * 6 + ["diatom", None, None]
    (note,) = report.domains["LAB"].notes
    assert "6 class cell(s)" in note and "'NA'" in note and "unlabelled" in note
    assert (report.domains["LAB"].labelled, report.domains["LAB"].unlabelled) == (1, 8)


def test_a_row_missing_only_optional_trailing_cells_is_padded(rd: SimpleNamespace, tmp_path: Path) -> None:
    layout = write_layout(tmp_path / "LAB", [plain_profile()] * 3)
    rows = [
        "images/0.png,profiles/0.csv",  # no class, no particle id: unlabelled, id from the image path
        "images/1.png,profiles/1.csv,diatom",  # no particle id
        "images/2.png,profiles/2.csv,diatom,p2",
        "images/2.png",  # no profile cell: still malformed
        "images/0.png,profiles/0.csv,diatom,p9,extra",  # too many: still malformed
    ]
    write_annotations(layout, "image,profile,class,particle_id", rows)
    report, out = rd.run(layout, tmp_path / "out", crop_header_px=0)
    assert {k: r["label"] for k, r in out.items()} == {
        "LAB:images/0.png": None, "LAB:images/1.png": "diatom", "LAB:p2": "diatom"
    }  # fmt: skip
    bad = rd.quarantined(tmp_path / "out")
    assert {k: e["reason"] for k, e in bad.items()} == {"line 5": "malformed_row", "line 6": "malformed_row"}
    assert "1 fields, expected 4" in bad["line 5"]["message"] and "'profile' cell" in bad["line 5"]["message"]
    (note,) = report.domains["LAB"].notes  # a cell left out in the middle reads the same: say so
    assert note == (
        f"2 row(s) of {layout / 'annotations.csv'} had fewer cells than its header (e.g. line 2); "
        "their missing last cells (class, particle_id) were read as empty"
    )
    assert f"note: {note}" in report.summary()


def test_a_row_missing_a_middle_cell_is_read_padded_and_noted(rd: SimpleNamespace, tmp_path: Path) -> None:
    """'img,prof,ID' under image,profile,class,particle_id: the id is read as the class (it cannot be
    told from a row whose particle id cell was dropped), and the report names the line."""
    layout = write_layout(tmp_path / "LAB", [plain_profile()] * 2)
    rows = ["images/0.png,profiles/0.csv,diatom,p0", "images/1.png,profiles/1.csv,p1"]
    write_annotations(layout, "image,profile,class,particle_id", rows)
    report, out = rd.run(layout, tmp_path / "out", crop_header_px=0)
    assert out["LAB:images/1.png"]["label"] == "p1" and report.quarantined == 0
    (note,) = report.domains["LAB"].notes
    assert note.startswith("1 row(s) of ") and "(e.g. line 3)" in note
    assert "missing last cells (particle_id) were read as empty" in note
