"""Checks shared by all readers: images, profiles, paths. Each raises ``Rejected(reason, message)``.

The image check decodes every image once (a truncated JPEG only fails when its pixels are read),
rejects images above the pixel limit from their header alone (before any pixel is decoded), and
rejects crops that show no object. A crop is empty only if two measures, both on the 8-bit scale,
find nothing:

- edge contrast: the 99.9th percentile of |image - Gaussian-blurred image| (sigma 8 px). A smooth
  background gradient (the ULCO failed crop, 1280x400) scores 11, the faintest real object in
  ../shared/realdata 52; the default threshold 24 sits between them with a factor of ~2 on both sides.
- object contrast, asked only when the edges say "empty": a defocused, transparent or thin particle
  has weak edges but stands out from its background as a whole. 69 of the 506 real FlowCam crops in
  ../shared/realdata (edge contrast 14-23) and the defocused cells of an independently written
  CytoSense-like generator (17-23) are such particles. The crop is smoothed (sigma 1 px: pixel noise
  out, 2-3 px wide particles kept), shrunk to at most 64 px, and its background removed as a row term
  plus a column term (medians; this removes bands and linear or radial illumination, which are sums of
  a function of x and one of y); the measure is the 99.9th percentile of what is left. The ULCO failed
  crop scores 4.7 and backgrounds of real crops at most 6, the faint FlowCam particles 10.5-14 and the
  generator's faint cells 11 and more; synthetic backgrounds with pixel noise up to 6.4 gray levels
  (std) score at most 6. Its threshold is a third of the edge threshold (8 by default), so one setting
  moves both.
"""

from __future__ import annotations

import io
import os
import warnings
from bisect import bisect_right
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import accumulate

import numpy as np
from PIL import Image, ImageChops, ImageFilter

from xmodal.data.channels import ChannelMap
from xmodal.data.quarantine import Rejected
from xmodal.data.transforms import to_gray8

DEFAULT_MAX_PIXELS = 4096 * 4096  # real CytoSense crops are <= 1280x400; full frames 1936x1464
DEFAULT_EMPTY_CONTRAST = 24.0  # gray levels (0-255), see the module docstring
_BLUR_SIGMA = 8.0  # px: wider than a crop's edges, narrower than background gradients
_CONTRAST_QUANTILE = 0.999  # ignores isolated specks (dust, JPEG ringing), keeps objects of >= 0.1% area
_OBJECT_SMOOTH_SIGMA = 1.0  # px: pixel noise out, thin (2-3 px) and soft objects kept
_OBJECT_SIDE = 64  # px: the object measure works on the crop shrunk to this size
_OBJECT_SHARE = 1 / 3  # object-contrast threshold as a share of the edge-contrast threshold
_PNG_MODES = {"1", "L", "LA", "I;16", "P", "RGB", "RGBA"}  # others (e.g. CMYK JPEG) go to RGB


@dataclass(frozen=True)
class ReaderOptions:
    crop_header_px: int = 0  # rows cut from the top of every image (the SYKE 25-px scale bar)
    max_pixels: int = DEFAULT_MAX_PIXELS
    channel_map: ChannelMap = field(default_factory=ChannelMap)
    fill_missing: bool = False  # zero-fill channels the file lacks (recorded in channel_mask)
    empty_contrast: float = DEFAULT_EMPTY_CONTRAST

    def __post_init__(self) -> None:
        if self.crop_header_px < 0:
            raise ValueError(f"crop_header_px must be >= 0, got {self.crop_header_px}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")


@contextmanager
def pil_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Make PIL itself refuse images far above the limit (it raises above 2x MAX_IMAGE_PIXELS)."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        # Between 1x and 2x PIL only warns; check_image rejects those images itself.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def set_pil_pixel_limit(max_pixels: int) -> None:
    """Process-wide variant of ``pil_pixel_limit`` for ingest worker processes."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def image_contrast(gray: Image.Image) -> int:
    """99.9th percentile of |pixel - local background| on the 8-bit scale (0 for a constant image).

    Computed with PIL's C operations and a 256-bin histogram (no per-pixel numpy work).
    """
    diff = ImageChops.difference(gray, gray.filter(ImageFilter.GaussianBlur(_BLUR_SIGMA)))
    cumulative = list(accumulate(diff.histogram()))
    return bisect_right(cumulative, int(_CONTRAST_QUANTILE * cumulative[-1]))


def object_contrast(gray: Image.Image) -> float:
    """99.9th percentile of |smoothed pixel - (row background + column background)| on the 8-bit
    scale: how far the strongest 0.1% of the crop stands out from a background that varies only as
    f(x) + g(y). Finds soft-edged objects that ``image_contrast`` misses (see the module docstring)."""
    g = gray.filter(ImageFilter.GaussianBlur(_OBJECT_SMOOTH_SIGMA))
    if max(g.size) > _OBJECT_SIDE:
        scale = _OBJECT_SIDE / max(g.size)
        g = g.resize((max(1, round(g.width * scale)), max(1, round(g.height * scale))), Image.BOX)
    a = np.asarray(g, dtype=np.float32)
    r = a - np.median(a, axis=1, keepdims=True)
    r -= np.median(r, axis=0, keepdims=True)
    return float(np.quantile(np.abs(r), _CONTRAST_QUANTILE))


def check_image(
    data: bytes, opts: ReaderOptions, crop_box: tuple[int, int, int, int] | None = None
) -> tuple[bytes, tuple[int, int]]:
    """Validate encoded image bytes -> (bytes to store, (height, width)).

    ``crop_box`` = (x, y, width, height) inside the image (cyz2json's cropRectangle). An image of
    exactly the box's width x height is that crop already (cyz2json's image-processing option
    stores the crop and where it sat in the camera frame) and is kept as it is. The original bytes
    are stored unless the image was cropped (crop box or header), then the crop is stored as PNG.
    """
    # Pillow's decoders raise many types on corrupt input (OSError, SyntaxError, struct.error,
    # IndexError, ...); any of them means "this image cannot be read", never "stop the ingest".
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise Rejected("image_too_large", f"{e} (limit --max-pixels {opts.max_pixels})") from None
    except Exception as e:
        raise Rejected("unreadable_image", f"cannot open image ({len(data)} bytes): {e!r}") from None
    w, h = im.size
    if w * h > opts.max_pixels:
        raise Rejected(
            "image_too_large", f"{w}x{h} = {w * h} pixels exceeds the limit {opts.max_pixels} (--max-pixels)"
        )
    try:
        im.load()
    except Image.DecompressionBombError as e:
        raise Rejected("image_too_large", str(e)) from None
    except Exception as e:
        raise Rejected("unreadable_image", f"cannot decode {w}x{h} {im.format} image: {e!r}") from None
    cropped = False
    if crop_box is not None and tuple(crop_box[2:]) != (w, h):  # same size: the crop already
        x, y, cw, ch = (int(v) for v in crop_box)
        if cw < 1 or ch < 1 or x < 0 or y < 0 or x + cw > w or y + ch > h:
            raise Rejected("malformed_row", f"cropRectangle {crop_box} lies outside the {w}x{h} image")
        im, w, h, cropped = im.crop((x, y, x + cw, y + ch)), cw, ch, True
    if opts.crop_header_px:
        if h <= opts.crop_header_px:
            raise Rejected(
                "empty_image",
                f"image height {h} px leaves nothing after the {opts.crop_header_px}-px header crop",
            )
        im, h, cropped = im.crop((0, opts.crop_header_px, w, h)), h - opts.crop_header_px, True
    gray = to_gray8(im)
    contrast = image_contrast(gray)
    if contrast < opts.empty_contrast:
        soft, soft_min = object_contrast(gray), _OBJECT_SHARE * opts.empty_contrast
        if soft < soft_min:
            raise Rejected(
                "empty_image",
                f"{w}x{h} image shows no object: edge contrast {contrast:.0f} < {opts.empty_contrast:g} "
                f"and object contrast {soft:.1f} < {soft_min:.3g} gray levels",
            )
    if cropped:
        data = _encode_png(im)
    return data, (h, w)


def _encode_png(im: Image.Image) -> bytes:
    """A crop -> PNG bytes. Wide integer grayscale (16-bit of either byte order, 32-bit "I") is
    stored as 16-bit, values clipped to 0-65535, which ``to_gray8`` reads as it read the original;
    PIL's convert("RGB") would clip it at 255 (a white crop) and PNG has no 32-bit integer mode."""
    if im.mode == "I" or im.mode.startswith("I;16"):
        im = Image.fromarray(np.clip(np.asarray(im), 0, 65535).astype(np.uint16))
    elif im.mode not in _PNG_MODES:
        im = im.convert("RGB")
    buf = io.BytesIO()
    try:
        im.save(buf, format="PNG")
    except Exception as e:  # any mode or encoder failure rejects this crop, never the ingest
        raise Rejected("unreadable_image", f"cannot re-encode the {im.mode} crop as PNG: {e!r}") from None
    return buf.getvalue()


def check_profile(profile: np.ndarray, names: tuple[str, ...]) -> None:
    """Reject NaN/inf (including float32 overflow); ``names`` label the rows in messages."""
    bad = ~np.isfinite(profile)
    if bad.any():
        c, t = (int(v) for v in np.argwhere(bad)[0])
        raise Rejected(
            "non_finite",
            f"{int(bad.sum())} non-finite value(s); first: channel {names[c]} sample {t} = {profile[c, t]}",
        )


def safe_path(root: str, rel: str) -> str:
    """Join ``rel`` (from annotations.csv) to ``root``; reject paths that leave ``root``.

    ``\\`` separates folders too (annotations.csv written on Windows), so a file name cannot hold
    one. Lexical check (no symlink resolution): what is rejected is the *annotation* pointing
    outside the dataset, which is how a crafted annotations.csv would read arbitrary files.
    """
    if os.sep == "/":
        rel = rel.replace("\\", "/")
    full = os.path.normpath(os.path.join(root, rel))
    if not full.startswith(root.rstrip(os.sep) + os.sep):
        raise Rejected("path_escape", f"path {rel!r} resolves to {full}, outside the dataset folder {root}")
    return full


def read_bytes(path: str, what: str, unreadable_reason: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise Rejected("missing_file", f"{what} file {path} does not exist") from None
    except OSError as e:
        raise Rejected(unreadable_reason, f"cannot read {what} file {path}: {e}") from None
