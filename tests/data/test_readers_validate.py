"""The empty-crop check: a crop is quarantined as empty only when neither its edges nor its
soft-edged content stand out from the background. Backgrounds and objects are built here from
formulas (a background that is a sum of a function of x and one of y, a disk of known depth), and the
real ULCO failed crop must stay empty while every real object crop passes: the CytoSense crops, and
the FlowCam and IFCB crops of ../shared/realdata, whose faint and thin particles are the hard case."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from xmodal.data.quarantine import Rejected
from xmodal.data.readers.validate import ReaderOptions, check_image, image_contrast, object_contrast
from xmodal.data.transforms import to_gray8

DEFAULT = ReaderOptions()


def encode(a: np.ndarray, fmt: str = "PNG") -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).save(b, format=fmt, quality=85)
    return b.getvalue()


def background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Illumination of the kinds crops show: a level, linear ramps, a horizontal band, radial falloff."""
    y, x = np.mgrid[:h, :w].astype(np.float64)
    return (
        rng.uniform(140, 200)
        + rng.uniform(-15, 15) * x / w
        + rng.uniform(-15, 15) * y / h
        + 8 * np.sin(y / rng.uniform(8, 30))
        - 20 * (((x - w / 2) / w) ** 2 + ((y - h / 2) / h) ** 2)
    )


def disk(h: int, w: int, radius: float, depth: float, blur: float = 0.0) -> np.ndarray:
    """A dark disk of ``depth`` gray levels in the middle, optionally defocused (Gaussian ``blur`` px)."""
    y, x = np.mgrid[:h, :w]
    d = np.where((x - w / 2) ** 2 + (y - h / 2) ** 2 <= radius**2, -float(depth), 0.0)
    if blur:
        im = Image.fromarray((d + 128).astype(np.uint8)).filter(ImageFilter.GaussianBlur(blur))
        d = np.asarray(im, dtype=np.float64) - 128
    return d


def gray(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("h,w", [(40, 50), (90, 160), (400, 1280)])
def test_object_contrast_removes_row_plus_column_backgrounds_and_measures_object_depth(h, w):
    rng = np.random.default_rng(h)
    bg = background(h, w, rng)
    assert object_contrast(gray(bg)) <= 1.5  # only the rounding to 8 bits is left
    # a disk far wider than the smoothing (and than a pixel of the shrunk crop): its depth is measured,
    # a little low where the disk shifts the medians of rows with a ramp across them, never too high
    radius = max(6.0, 0.12 * min(h, w))
    for depth in (6, 12, 40):
        measured = object_contrast(gray(bg + disk(h, w, radius, depth)))
        assert 0.85 * depth - 1.5 <= measured <= depth + 1.0, (depth, measured)


def test_soft_edged_objects_are_kept_where_the_edge_measure_alone_would_reject_them():
    rng = np.random.default_rng(1)
    for h, w in ((60, 80), (150, 110)):
        a = background(h, w, rng) + disk(h, w, 0.2 * min(h, w), 20, blur=4) + rng.normal(0, 3, (h, w))
        for fmt in ("PNG", "JPEG"):
            data = encode(a, fmt)
            assert image_contrast(Image.open(io.BytesIO(data)).convert("L")) < DEFAULT.empty_contrast
            assert check_image(data, DEFAULT)[1] == (h, w)


@pytest.mark.parametrize("noise", [1.0, 3.0, 5.0])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_backgrounds_with_noise_and_no_object_are_quarantined(noise, fmt):
    rng = np.random.default_rng(int(noise))
    for h, w in ((30, 45), (120, 200), (400, 1280)):
        data = encode(background(h, w, rng) + rng.normal(0, noise, (h, w)), fmt)
        with pytest.raises(Rejected) as e:
            check_image(data, DEFAULT)
        assert e.value.reason == "empty_image" and "object contrast" in e.value.message


def test_one_setting_moves_both_thresholds():
    rng = np.random.default_rng(2)
    data = encode(background(60, 80, rng) + disk(60, 80, 12, 20, blur=4) + rng.normal(0, 3, (60, 80)))
    check_image(data, DEFAULT)
    with pytest.raises(Rejected):  # object contrast ~16 < 60 / 3
        check_image(data, ReaderOptions(empty_contrast=60))
    check_image(encode(np.full((30, 30), 128.0)), ReaderOptions(empty_contrast=0))  # 0 turns the check off


def test_real_crops_failed_one_empty_every_other_one_kept(realdata: Path):
    crops = sorted(realdata.glob("cytosense_*/derived/syke_layout/images/*.jpg"))
    assert len(crops) == 9, crops
    for path in crops:
        data = path.read_bytes()
        if path.name == "ulco_r4_29.jpg":  # the 1280x400 failed crop: a band of background
            with pytest.raises(Rejected) as e:
                check_image(data, DEFAULT)
            assert e.value.reason == "empty_image"
            assert object_contrast(Image.open(path).convert("L")) < DEFAULT.empty_contrast / 3 / 1.5
        else:
            check_image(data, DEFAULT)


def flowcam_crops(realdata: Path) -> list[Image.Image]:
    """The 506 crops of the FlowCam run: boxes from the VisualSpreadsheet .lst, cut from the collage."""
    stem = realdata / "flowcam_morphocut" / "flowcam_COMICS_DY086_20171118_MSC019_t0_4x"
    lines = Path(f"{stem}.lst").read_text(encoding="latin-1").splitlines()
    n_fields = int(lines[1].split("|")[1])
    names = [line.split("|")[0] for line in lines[2 : 2 + n_fields]]
    collage = Image.open(f"{stem}_000001.tif").convert("L")
    crops = []
    for line in lines[2 + n_fields :]:
        f = dict(zip(names, line.split("|")))
        x, y, w, h = (int(f[k]) for k in ("image_x", "image_y", "image_w", "image_h"))
        crops.append(collage.crop((x, y, x + w, y + h)))
    return crops


def ifcb_rois(realdata: Path) -> list[Image.Image]:
    """The ROIs of the new-style IFCB bin: .adc columns 16-18 (1-based) are width, height, start byte."""
    stem = realdata / "ifcb_pyifcb" / "D20130526T095207_IFCB013"
    pixels = np.fromfile(f"{stem}.roi", dtype=np.uint8)
    rois = []
    for row in np.loadtxt(f"{stem}.adc", delimiter=",", ndmin=2):
        w, h, start = int(row[15]), int(row[16]), int(row[17])
        if w and h:
            rois.append(Image.fromarray(pixels[start : start + w * h].reshape(h, w)))
    return rois


def test_faint_and_thin_particles_of_other_real_instruments_are_kept(realdata: Path):
    flowcam, ifcb = flowcam_crops(realdata), ifcb_rois(realdata)
    assert (len(flowcam), len(ifcb)) == (506, 19)
    soft_edged = 0
    for im in flowcam + ifcb:
        soft_edged += image_contrast(im) < DEFAULT.empty_contrast
        check_image(encode(np.asarray(im, dtype=np.float64)), DEFAULT)
    # the edge measure alone would have quarantined 69 of these particles (14% of the FlowCam run)
    assert soft_edged >= 50


@pytest.mark.parametrize("mode", ["I;16B", "I"])
def test_wide_integer_tiff_keeps_its_gray_levels_when_the_header_is_cut(mode: str) -> None:
    """Big-endian 16-bit (ImageJ) and 32-bit integer TIFFs: the stored crop is 16-bit PNG with the
    same values, so it decodes (``to_gray8``) to the gray levels of the original rows."""
    y, x = np.mgrid[:80, :60]
    a = (x * 900 + y * 97).astype(np.int64)  # a ramp over the 16-bit range, not multiples of 257
    a[40:60, 20:40] = 3000  # the particle
    if mode == "I;16B":
        im = Image.frombytes(mode, (60, 80), a.astype(">u2").tobytes())
    else:
        a[0, :3] = (-5, 70000, 2**31 - 1)  # outside 0-65535: clipped, as to_gray8 clips them
        im = Image.fromarray(a.astype(np.int32))
    buf = io.BytesIO()
    im.save(buf, format="TIFF")
    data, hw = check_image(buf.getvalue(), ReaderOptions(crop_header_px=25))
    assert hw == (55, 60)
    stored = Image.open(io.BytesIO(data))
    assert (stored.format, stored.mode) == ("PNG", "I;16")
    np.testing.assert_array_equal(np.asarray(stored), np.clip(a, 0, 65535)[25:])
    original = Image.open(io.BytesIO(buf.getvalue()))
    np.testing.assert_array_equal(np.asarray(to_gray8(stored)), np.asarray(to_gray8(original))[25:])


def test_a_crop_that_cannot_be_re_encoded_is_rejected_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(np.pad(np.full((20, 20), 40.0), 10, constant_values=200))

    def fail(*args, **kwargs):
        raise OSError("cannot write mode X as PNG")

    monkeypatch.setattr(Image.Image, "save", fail)
    with pytest.raises(Rejected) as e:
        check_image(data, ReaderOptions(crop_header_px=2))
    assert e.value.reason == "unreadable_image" and "cannot write mode X" in e.value.message
