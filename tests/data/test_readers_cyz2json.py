"""cyz2json JSON: the real beads file (CytoBuoy's reader), the Cefas/ULCO re-packagings, corrupted copies."""

from __future__ import annotations

import base64
import copy
import gzip
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw

from xmodal.data.quarantine import DataError
from xmodal.data.readers import detect_format

BEADS_FILE = "BeadsCalibration 2017-02-08 13h50_Beads.cyz2json-layout.json.gz"
ULCO_JSON = "ulco_r4.cyz2json-layout.json"


def test_beads_json_gives_535_particles_with_mapped_channels(
    rd: SimpleNamespace, realdata: Path, tmp_path: Path
) -> None:
    path = realdata / rd.BEADS / "derived" / BEADS_FILE
    report, rows = rd.run(path, tmp_path)
    assert (report.seen, report.ingested, report.quarantined) == (535, 535, 0)
    (channels,) = report.domains["BeadsCalibration_2017-02-08_13h50_Beads.cyz2json-layout"].channels
    # 11 instrument channels: the direct FWS and the high-sensitivity detectors win
    assert channels["mapping"] == {
        "FWS": "FWS", "SWS": "SWS HS", "FL Yellow": "FL Yellow HS",
        "FL Orange": "FL Orange HS", "FL Red": "FL Red HS", "Curvature": "Curvature",
    }  # fmt: skip
    assert sorted(channels["unused"]) == ["FL Red LS", "FL Yellow LS", "FWS L", "FWS R", "SWS LS"]
    doc = json.loads(gzip.open(path).read())
    source = ["FWS", "SWS HS", "FL Yellow HS", "FL Orange HS", "FL Red HS", "Curvature"]
    lengths = []
    for p in doc["particles"]:
        shapes = {s["description"]: s["values"] for s in p["pulseShapes"]}
        row = rows[f"BeadsCalibration_2017-02-08_13h50_Beads.cyz2json-layout:{p['particleId']}"]
        expected = np.array([shapes[c] for c in source], dtype=np.float64).astype(np.float32)
        np.testing.assert_array_equal(rd.profile(row), expected)
        assert not row["has_image"]
        lengths.append(row["profile_length"])
    assert (min(lengths), max(lengths)) == (24, 48)


def test_cefas_json_equals_the_cytoclus_export(
    rd: SimpleNamespace, realdata: Path, tmp_path: Path, cefas_ingested
) -> None:
    """The same 817 particles through two readers: identical profiles and image bytes."""
    _, from_json = rd.run(
        realdata / rd.CEFAS / "derived" / "cefas_pond.cyz2json-layout.json.gz", tmp_path / "j"
    )
    _, from_csv = cefas_ingested
    by_id = {k.rsplit(":", 1)[1]: v for k, v in from_csv.items()}
    assert len(from_json) == len(by_id) == 817
    for key, row in from_json.items():
        other = by_id[key.rsplit(":", 1)[1]]
        assert row["profile"] == other["profile"] and row["image"] == other["image"]
        assert (row["image_height"], row["image_width"]) == (other["image_height"], other["image_width"])
    assert sum(r["has_image"] for r in from_json.values()) == 4


def test_ulco_json_quarantines_the_failed_crop(rd: SimpleNamespace, realdata: Path, tmp_path: Path) -> None:
    report, rows = rd.run(realdata / rd.ULCO / "derived" / ULCO_JSON, tmp_path)
    assert (report.ingested, report.reasons) == (8, {"empty_image": 1})
    assert rd.quarantined(tmp_path)["ulco_r4.cyz2json-layout:29"]["reason"] == "empty_image"
    assert rows["ulco_r4.cyz2json-layout:0"]["profile_length"] == 20


@pytest.fixture
def ulco_doc(rd: SimpleNamespace, realdata: Path) -> dict:
    return json.loads((realdata / rd.ULCO / "derived" / ULCO_JSON).read_text())


def _write(doc: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        json.dump(doc, f)
    return path


def _particle(doc: dict, pid: int) -> dict:
    return next(p for p in doc["particles"] if p["particleId"] == pid)


def _image(doc: dict, pid: int) -> dict:
    return next(i for i in doc["images"] if i["particleId"] == pid)


def test_corrupted_particles_get_their_reasons(rd: SimpleNamespace, ulco_doc: dict, tmp_path: Path) -> None:
    doc = copy.deepcopy(ulco_doc)
    _image(doc, 3269)["base64"] = "not base64!!"
    _particle(doc, 1)["pulseShapes"][2]["values"].pop()  # FL Yellow one sample short
    _particle(doc, 2)["pulseShapes"][4]["values"][3] = None  # null -> NaN
    doc["particles"].append(copy.deepcopy(_particle(doc, 3)))  # repeated particleId
    doc["images"].append({**_image(doc, 3543), "particleId": 777})  # image without particle
    report, rows = rd.run(_write(doc, tmp_path / "in" / "ulco.json.gz"), tmp_path / "out")
    reasons = {k.split(":")[1]: e["reason"] for k, e in rd.quarantined(tmp_path / "out").items()}
    assert reasons == {
        "29": "empty_image", "3269": "unreadable_image", "1": "length_mismatch", "2": "non_finite",
        "3": "duplicate_id", "777": "unmatched_id",
    }  # fmt: skip
    assert report.seen == 11 and report.ingested == 5 and "ulco:3" in rows  # the first 3 is kept


def test_crop_rectangle_crops_the_image(rd: SimpleNamespace, ulco_doc: dict, tmp_path: Path) -> None:
    doc = copy.deepcopy(ulco_doc)
    _image(doc, 4206)["cropRectangle"] = {"X": 20, "Y": 10, "Width": 150, "Height": 60}
    _image(doc, 3543)["cropRectangle"] = {"X": 40, "Y": 40, "Width": 60, "Height": 60}  # outside 80x80
    report, rows = rd.run(_write(doc, tmp_path / "in" / "ulco.json.gz"), tmp_path / "out")
    row = rows["ulco:4206"]
    assert (row["image_height"], row["image_width"]) == (60, 150)
    original = Image.open(io.BytesIO(base64.b64decode(_image(ulco_doc, 4206)["base64"])))
    stored = Image.open(io.BytesIO(row["image"]))
    assert stored.format == "PNG"
    np.testing.assert_array_equal(np.asarray(stored), np.asarray(original)[10:70, 20:170])
    assert rows["ulco:3269"]["image"] == base64.b64decode(_image(ulco_doc, 3269)["base64"])  # untouched
    entry = rd.quarantined(tmp_path / "out")["ulco:3543"]
    assert entry["reason"] == "malformed_row" and "outside the 80x80 image" in entry["message"]


def test_missing_channel_is_an_error_or_a_masked_zero_channel(
    rd: SimpleNamespace, ulco_doc: dict, tmp_path: Path
) -> None:
    doc = copy.deepcopy(ulco_doc)
    doc["instrument"]["channels"] = [
        c for c in doc["instrument"]["channels"] if c["description"] != "FL Orange"
    ]
    path = _write(doc, tmp_path / "in" / "ulco.json.gz")
    with pytest.raises(
        DataError, match=r"ulco\.json\.gz: no column for canonical channel\(s\) \['FL Orange'\]"
    ):
        rd.run(path, tmp_path / "out")
    report, rows = rd.run(path, tmp_path / "out", fill_missing=True)
    row = rows["ulco:0"]
    assert row["channel_mask"] == [True, True, True, False, True, True]
    assert not rd.profile(row)[3].any() and rd.profile(row)[4].any()
    assert report.domains["ulco"].channels[0]["mapping"]["FL Orange"] is None


def test_two_files_with_one_source_name_are_refused(
    rd: SimpleNamespace, ulco_doc: dict, tmp_path: Path
) -> None:
    """Particle ids are '<source>:<id>': ulco.json and ulco.json.gz would collide."""
    _write(ulco_doc, tmp_path / "in" / "ulco.json.gz")
    (tmp_path / "in" / "ulco.json").write_text(json.dumps(ulco_doc))
    with pytest.raises(DataError, match="both get the source name 'ulco'"):
        rd.run(tmp_path / "in", tmp_path / "out")


CHANNELS6 = ["FWS", "SWS", "FL Yellow", "FL Orange", "FL Red", "Curvature"]


def _jpeg(size: tuple[int, int] = (60, 50)) -> bytes:
    """A dark ellipse on a bright background (passes the empty-crop check), as JPEG bytes."""
    w, h = size
    im = Image.new("L", size, 190)
    ImageDraw.Draw(im).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=40)
    b = io.BytesIO()
    im.save(b, format="JPEG", quality=95)
    return b.getvalue()


def _doc(n_particles: int, images: list[dict], channels: list[str] = CHANNELS6) -> dict:
    """A minimal cyz2json document: particles 0..n-1 with 3-sample pulses for ``channels``."""
    shapes = [{"description": c, "values": [1.0 + i, 5.0, 2.0]} for i, c in enumerate(channels)]
    particles = [{"particleId": pid, "pulseShapes": shapes} for pid in range(n_particles)]
    return {
        "filename": "x.cyz",
        "instrument": {
            "name": "I",
            "channels": [{"id": i, "description": c} for i, c in enumerate(channels)],
        },
        "particles": particles,
        "images": images,
    }


def test_images_already_cropped_by_cyz2json_are_kept_as_they_are(rd: SimpleNamespace, tmp_path: Path) -> None:
    """cyz2json's image-processing option writes the crop itself and where it sat in the camera frame."""
    jpeg = _jpeg()
    images = [
        {"particleId": pid, "base64": base64.b64encode(jpeg).decode(), "cropRectangle": rect}
        for pid, rect in enumerate(
            [{"X": 812, "Y": 604, "Width": 60, "Height": 50}, {"X": 0, "Y": 0, "Width": 60, "Height": 50}]
        )
    ]
    report, rows = rd.run(_write(_doc(2, images), tmp_path / "in" / "s.json.gz"), tmp_path / "out")
    assert (report.ingested, report.quarantined) == (2, 0)
    for pid in (0, 1):
        assert rows[f"s:{pid}"]["image"] == jpeg
        assert (rows[f"s:{pid}"]["image_height"], rows[f"s:{pid}"]["image_width"]) == (50, 60)


def test_string_ids_wrapped_base64_upper_case_suffix_and_an_unused_repeated_channel(
    rd: SimpleNamespace, tmp_path: Path
) -> None:
    jpeg = _jpeg()
    b64 = base64.b64encode(jpeg).decode()
    images = [{"particleId": "1", "base64": "\r\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))}]
    doc = _doc(2, images, channels=CHANNELS6 + ["FWS L", "FWS L"])  # FWS L is not used (FWS is)
    path = tmp_path / "in" / "S.JSON.GZ"
    _write(doc, path)
    assert detect_format(path.parent) == "cyz2json"
    report, rows = rd.run(path.parent, tmp_path / "out")
    assert (report.seen, report.ingested, report.quarantined) == (2, 2, 0)
    assert rows["S:1"]["image"] == jpeg and not rows["S:0"]["has_image"]
    assert rd.profile(rows["S:0"])[:, 0].tolist() == [1, 2, 3, 4, 5, 6]
