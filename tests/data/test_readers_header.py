"""Scale-bar header detection (xmodal/data/readers/header.py) and ``ingest``'s default
``--crop-header auto``: a header drawn into every crop is found and cut exactly, crops without one
(noisy, flat, real) are left whole."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xmodal.data.readers.header import MIN_IMAGES, detect_header, too_few_images

HEADER = 25


def draw_header(width: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """A white band with a dark 10-um bar and a blocky label, drawn at fixed places (the SYKE look)."""
    band = np.full((HEADER, width), 255, np.uint8)
    band[9:12, 2 : min(width, 20)] = 0
    band[14:21, 2 : min(width, 26) : 3] = 30
    return band


def crops(n: int, seed: int, header: bool, noise: float = 3.0, flat: bool = False) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = int(rng.integers(12, 120)), int(rng.integers(20, 140))
        level = 180.0 if flat else rng.uniform(140, 200)
        img = np.full((h, w), level) + rng.normal(0, noise, (h, w))
        cy, cx, r = h / 2, w / 2, min(h, w) / 3
        yy, xx = np.mgrid[:h, :w]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] -= 80
        img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        out.append(np.vstack([draw_header(w), img]) if header else img)
    return out


def test_a_drawn_header_is_found_at_its_height() -> None:
    assert detect_header(crops(64, 0, header=True)) == HEADER
    # noise-free crops whose backgrounds differ per image: the band still ends at the header
    assert detect_header(crops(64, 1, header=True, noise=0.0)) == HEADER


@pytest.mark.parametrize(
    "images",
    [
        crops(64, 2, header=False),  # sensor noise: no two background rows are the same
        crops(64, 3, header=False, noise=0.0, flat=True),  # identical flat backgrounds: no drawing
        crops(7, 4, header=True),  # too few images to tell
    ],
    ids=["noisy", "flat", "few"],
)
def test_no_header_is_claimed_without_evidence(images) -> None:
    assert detect_header(images) == 0


def test_too_few_images_says_how_many_it_had() -> None:
    crop = np.vstack([draw_header(40), np.full((30, 40), 180, np.uint8)])
    assert too_few_images([crop] * (MIN_IMAGES - 1)) == MIN_IMAGES - 1
    assert too_few_images([crop] * MIN_IMAGES) is None  # enough to decide
    assert too_few_images([crop] * 3 + [crop[:10]] * 9) == 3  # too short to hold a header: not counted
    assert too_few_images([]) is None  # a source without images has no header to miss


def _png(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(a).save(b, format="PNG")
    return b.getvalue()


def test_ingest_finds_and_cuts_the_header_by_default(rd, tmp_path: Path) -> None:
    from xmodal.data.synth import synthesize

    synthesize(tmp_path / "raw", 40, 0, 0, seed=3, fmt="syke", image_size=32, header_px=0)
    layout = tmp_path / "raw" / "LAB"
    originals = {}
    for f in sorted((layout / "images").iterdir()):
        a = np.asarray(Image.open(f))
        originals[f.name] = a
        f.write_bytes(_png(np.vstack([draw_header(a.shape[1]), a])))

    report, rows = rd.run(tmp_path / "raw", tmp_path / "out")
    assert report.domains["LAB"].crop_header_px == {"LAB": HEADER} and report.domains["LAB"].notes == []
    assert report.options["crop_header_px"] == "auto" and report.seen == report.ingested == 40
    assert len(rows) == 40
    by_image = {Image.open(io.BytesIO(r["image"])).tobytes(): r for r in rows.values()}
    for a in originals.values():  # exactly the crops as they were before the header was drawn
        row = by_image[Image.fromarray(a).tobytes()]
        assert (row["image_height"], row["image_width"]) == a.shape

    kept, rows = rd.run(tmp_path / "raw", tmp_path / "kept", crop_header_px=0)  # the header kept on request
    assert kept.domains["LAB"].crop_header_px == {"LAB": 0}
    assert {r["image_height"] for r in rows.values()} == {a.shape[0] + HEADER for a in originals.values()}


def test_ingest_leaves_crops_without_a_header_whole(rd, tmp_path: Path) -> None:
    from xmodal.data.synth import synthesize

    synthesize(tmp_path / "raw", 40, 0, 0, seed=4, fmt="syke", image_size=32, header_px=0)
    report, rows = rd.run(tmp_path / "raw", tmp_path / "out")
    assert report.domains["LAB"].crop_header_px == {"LAB": 0} and report.domains["LAB"].notes == []
    heights = sorted(
        np.asarray(Image.open(f)).shape[0] for f in (tmp_path / "raw" / "LAB" / "images").iterdir()
    )
    assert sorted(r["image_height"] for r in rows.values()) == heights


def test_a_source_too_small_to_decide_is_noted(rd, tmp_path: Path) -> None:
    from xmodal.data.synth import synthesize

    synthesize(tmp_path / "raw", 5, 0, 0, seed=4, fmt="syke", image_size=32)  # the band drawn on top
    report, rows = rd.run(tmp_path / "raw", tmp_path / "out")
    assert report.domains["LAB"].crop_header_px == {"LAB": 0} and len(rows) == 5
    (note,) = report.domains["LAB"].notes
    assert note == (
        "LAB: too few images (5) to detect a scale-bar header; pass --crop-header N if the crops carry one"
    )
    assert f"note: {note}" in report.summary()
    saved = json.loads((tmp_path / "out" / "ingest_report.json").read_text())
    assert saved["domains"]["LAB"]["notes"] == [note]
    told, _ = rd.run(tmp_path / "raw", tmp_path / "told", crop_header_px=HEADER)  # no auto detection: no note
    assert told.domains["LAB"].notes == []


def test_readers_without_a_header_get_no_note(cefas_ingested) -> None:
    report, _ = cefas_ingested  # CytoClus: 4 images, but its crops never carry a header
    assert report.options["crop_header_px"] == "auto"
    assert all(not d.notes for d in report.domains.values())


def test_cli_takes_auto_or_a_row_count() -> None:
    from xmodal.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["ingest", "src", "out"]).crop_header is None  # auto, the default
    assert parse(["ingest", "src", "out", "--crop-header", "auto"]).crop_header is None
    assert parse(["ingest", "src", "out", "--crop-header", "25"]).crop_header == 25
    for bad in ("-3", "top"):
        with pytest.raises(SystemExit):
            parse(["ingest", "src", "out", "--crop-header", bad])


def foreign_crops(
    n: int = 64,
    seed: int = 0,
    align: str = "left",
    noise: float = 0.0,
    margin: float = 12.0,
    background: float = 230.0,
    jpeg: int | None = None,
    header: bool = True,
) -> list[np.ndarray]:
    """Crops as another generator might draw them: smooth backgrounds at one level, a particle with
    a background margin around it, the bar and its label at the left, right or centre of the band."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = int(rng.integers(40, 160)), int(rng.integers(60, 160))
        img = np.full((h, w), background)
        yy, xx = np.mgrid[:h, :w]
        ry, rx = max(h / 2 - margin, 4), max(w / 2 - margin, 4)
        img[((yy - h / 2) / ry) ** 2 + ((xx - w / 2) / rx) ** 2 < 1] = 70
        if header:
            band = np.full((HEADER, w), 255.0)
            x0 = {"left": 4, "right": w - 30, "centre": w // 2 - 13}[align]
            band[8:11, x0 : x0 + 18] = 0  # the bar
            band[13:20, x0 : x0 + 26 : 3] = 20  # its label
            img = np.vstack([band, img])
        img = np.clip(np.rint(img + rng.normal(0, noise, img.shape)), 0, 255).astype(np.uint8)
        if jpeg:
            b = io.BytesIO()
            Image.fromarray(img).save(b, format="JPEG", quality=jpeg)
            img = np.asarray(Image.open(b))
        out.append(img)
    return out


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # smooth background: 12 more rows are shared below the band (cut 37 before)
        {"margin": 45},  # shared rows run past 64 (the header was kept whole before)
        {"align": "right"},
        {"align": "centre"},
        {"noise": 3.0},  # noise drawn over the band too
        {"noise": 1.0, "jpeg": 75},  # JPEG ringing around the label
        {"background": 30},  # dark crops under a light band
    ],
    ids=["smooth", "deep-margin", "right", "centre", "noisy-band", "jpeg", "dark-crops"],
)
def test_another_generators_header_is_cut_at_its_height(kwargs) -> None:
    assert detect_header(foreign_crops(**kwargs)) == HEADER


def test_a_band_as_light_as_the_background_keeps_the_rows_below_its_drawing() -> None:
    # the band's empty rows below the label look like the crops' own white margin: they are left
    assert detect_header(foreign_crops(background=255)) == 20


def test_a_shared_shading_is_not_a_header() -> None:
    # fixed-size canvases lit unevenly the same way, no band: every top row is the same in all
    rng = np.random.default_rng(3)
    canvases = []
    for _ in range(64):
        a = np.tile(240 - 150 * np.linspace(0, 1, 64), (64, 1))
        yy, xx = np.mgrid[:64, :64]
        cy, cx = rng.uniform(40, 56, 2)
        a[(yy - cy) ** 2 + (xx - cx) ** 2 < 100] = 60
        canvases.append(np.clip(np.rint(a + rng.normal(0, 0.5, a.shape)), 0, 255).astype(np.uint8))
    assert detect_header(canvases) == 0
    assert detect_header(foreign_crops(header=False)) == 0


@pytest.mark.parametrize("size,noise", [(60, 3.0), (60, 0.0), (100, 0.0), (100, 3.0)])
def test_one_particle_at_one_place_in_fixed_canvases_is_not_a_header(size: int, noise: float) -> None:
    # beads centred in fixed-size canvases: the particle is shared like a drawing would be
    rng = np.random.default_rng(7)
    canvases = []
    for i in range(16):
        a = np.full((size, size), 230.0) + rng.normal(0, noise, (size, size))
        a[size // 3 : 2 * size // 3, size // 4 : 3 * size // 4] = 60 + i % 8
        canvases.append(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    assert detect_header(canvases) == 0


def _band_crops(band, background: float = 200.0, n: int = 64) -> list[np.ndarray]:
    """Noisy crops (a dark particle) under ``band(width)``, drawn identically into each."""
    rng = np.random.default_rng(11)
    out = []
    for _ in range(n):
        h, w = int(rng.integers(12, 120)), int(rng.integers(30, 140))
        img = np.full((h, w), background) + rng.normal(0, 2.0, (h, w))
        img[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] -= 100
        out.append(np.clip(np.rint(np.vstack([band(w), img])), 0, 255).astype(np.uint8))
    return out


def _low_label(w: int) -> np.ndarray:  # the bar and its label in the lower half of the band
    b = np.full((HEADER, w), 255.0)
    b[14:17, 3 : min(w, 25)] = 0
    b[18:23, 3 : min(w, 30) : 3] = 0
    return b


def _bold_bar(w: int) -> np.ndarray:  # a bar filling the band's top rows across the window
    b = np.full((HEADER, w), 255.0)
    b[1:9, 0 : min(w, 60)] = 0
    b[12:18, 3 : min(w, 30) : 3] = 0
    return b


@pytest.mark.parametrize("band", [_low_label, _bold_bar], ids=["low-label", "bold-bar"])
def test_a_band_whose_drawing_sits_low_or_fills_its_top_is_cut_whole(band) -> None:
    assert detect_header(_band_crops(band)) == HEADER


def test_on_white_crops_no_drawn_pixel_is_left_in_the_image() -> None:
    from xmodal.data.synth_image import scale_bar_header

    crops = _band_crops(lambda w: scale_bar_header(w, HEADER, 0.5).astype(float), background=250.0)
    rows = detect_header(crops)
    band = scale_bar_header(64, HEADER, 0.5)
    assert rows <= HEADER and (band[rows:] == 255).all()  # only the band's empty rows stay
    assert rows >= 16  # the label and the bar are cut
