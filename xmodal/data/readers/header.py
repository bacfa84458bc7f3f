"""Finding a scale-bar header burnt into every crop of a source (``xmodal ingest --crop-header auto``).

The SYKE CytoSense images carry a 25-px band at the top with a scale bar and its label (the guide);
real crops from CytoClus or cyz2json carry none. Left in, the band is part of every image the
encoder sees, often half of a small particle's crop, and its height inflates the image-size
metadata. Measured on an independent generator that draws it: LAB I+P-I+P at n = 16 went from
84.8 % to 90.3 % once it was cropped (bench/RESULTS.md, "Scale-bar header").

The header is found as what no particle image can produce: the same pixels, row by row from the
top, in nearly every image of the source (drawn by software at a fixed place: at the left edge, the
right edge or the centre), holding a drawing (a dark bar or label on a light band, or the reverse)
on a band of one level. Rows of noisy background are never the same in that sense, and a source
without a drawing (flat or shaded backgrounds, however alike) is never cropped. A smooth,
noise-free background is the same in every crop down to where the particles begin, so the header
ends where uniform rows at the crops' background level begin, not where the shared rows end.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MIN_IMAGES = 8  # fewer readable images say nothing about a source
MAX_ROWS = 64  # a header this tall or taller is not a scale bar: refuse rather than crop particles
MIN_ROWS = 8
SHARE = 0.9  # of the sampled images must hold the same row
PIXEL_TOL = 12  # gray levels a pixel may differ from the row's median across images (noise, JPEG ringing)
ROW_SHARE = 0.9  # of a row's pixels within PIXEL_TOL for the row to be the same as the median's
EQUAL = 1.0  # gray levels: the median pixel of a drawn row differs from the median's by at most this
DRAWING = 64  # gray levels between a drawing's pixels (bar, label) and the band's own level
MIN_DRAWING_PX = 6
BAND_SHARE = 0.5  # of the header's pixels at the band's level: a drawing is sparse on a uniform band
LEVEL_TOL = 8  # gray levels from the band's level that still count as the band
MAX_WIDTH = 64  # columns compared, at the left edge, the right edge and the centre


def _comparable(images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], int]:
    """The images ``detect_header`` compares (2-D, tall enough for a header above some content, as
    wide as the columns compared) and the number of columns compared (0 if there are no images)."""
    imgs = [a for a in images if a.ndim == 2 and a.shape[0] > 2 * MIN_ROWS]
    if not imgs:
        return [], 0
    width = int(min(MAX_WIDTH, np.percentile([a.shape[1] for a in imgs], 10)))
    return [a for a in imgs if a.shape[1] >= width], width


def too_few_images(images: Sequence[np.ndarray]) -> int | None:
    """How many of ``images`` ``detect_header`` could compare when that is too few to decide (it then
    claims no header, whether or not the crops carry one); None when there are none or enough."""
    n = len(_comparable(images)[0])
    return n if 0 < n < MIN_IMAGES else None


def detect_header(images: Sequence[np.ndarray]) -> int:
    """Rows to crop off the top of every image of a source: the height of a header drawn identically
    into ``images`` (2-D uint8 gray arrays, a sample of the source's crops), or 0 if there is none
    (also when there are fewer than ``MIN_IMAGES`` to compare: see ``too_few_images``). The bar and
    its label may sit at the left edge, the right edge or the centre of the crops."""
    imgs, width = _comparable(images)
    if width < MIN_ROWS or len(imgs) < MIN_IMAGES:
        return 0
    windows = (
        [a[:, :width] for a in imgs],
        [a[:, a.shape[1] - width :] for a in imgs],
        [a[:, (a.shape[1] - width) // 2 : (a.shape[1] - width) // 2 + width] for a in imgs],
    )
    return max(_header_rows([w.astype(np.float32) for w in cols]) for cols in windows)


def _shared_rows(cols: list[np.ndarray]) -> int | None:
    """How many rows from the top are the same in nearly every image (up to ``MAX_ROWS``), or None
    when they are the same down to the bottom: near-identical crops (a particle drawn at one place
    in a fixed canvas) say nothing about a header."""
    for r in range(MAX_ROWS):
        have = [a[r] for a in cols if a.shape[0] > r + MIN_ROWS]  # a header is never the whole crop
        if len(have) < MIN_IMAGES:
            return None
        stack = np.stack(have)
        dev = np.abs(stack - np.median(stack, axis=0))
        # drawn by software: most pixels equal (sensor noise moves them all), the rest close (JPEG)
        same = (np.median(dev, axis=1) <= EQUAL) & ((dev <= PIXEL_TOL).mean(axis=1) >= ROW_SHARE)
        if same.mean() < SHARE:
            return r
    return MAX_ROWS


def _header_rows(cols: list[np.ndarray]) -> int:
    """The header's height in one window of columns. The shared rows bound it, but a smooth,
    noise-free background is shared too, down to where the particles begin: the rows below the
    header are told apart as uniform rows at the crops' background level (``_plain``)."""
    shared = _shared_rows(cols)
    if shared is None or shared < MIN_ROWS:
        return 0
    band = np.median(np.stack([a[:shared] for a in cols if a.shape[0] >= shared]), axis=0)
    background = float(np.median([np.median(a[-MIN_ROWS:]) for a in cols]))  # crops' bottom margins
    level = _band_level(band, background)
    band_like = abs(background - level) <= LEVEL_TOL  # no visible edge between band and image
    end = shared
    while end > 0 and _plain(band[end - 1], level, band_like):
        end -= 1
    drawn = np.abs(band[:end] - level) >= DRAWING
    if int(drawn.sum()) < MIN_DRAWING_PX:
        return 0  # a flat band or a shared gradient: nothing drawn
    if float((np.abs(band[:end] - level) <= LEVEL_TOL).mean()) < BAND_SHARE:
        return 0  # no uniform band under the "drawing": shading or texture, not a header
    if band_like and int(np.flatnonzero(drawn.any(axis=1))[0]) >= end / 2:
        # no band edge, and more empty rows above the "drawing" than drawing: a particle drawn
        # at one place in fixed canvases, not a label (which may sit low in a band of its own)
        return 0
    return end if MIN_ROWS <= end < MAX_ROWS else 0


def _band_level(band: np.ndarray, background: float) -> float:
    """The band's own gray level: its most common one, a drawing being sparse on it, leaving out
    the shared rows of smooth crop background below the band (a bold bar is then no band)."""
    at_background = np.array(
        [_uniform(r) and abs(float(np.median(r)) - background) <= LEVEL_TOL for r in band]
    )
    rows = band[~at_background] if not at_background.all() else band
    return float(
        np.argmax(np.bincount(np.clip(np.rint(rows), 0, 255).astype(np.int64).ravel(), minlength=256))
    )


def _uniform(row: np.ndarray) -> bool:
    """Nothing drawn in the row: no pixel a drawing's contrast away from its median (a bar's end
    tick is a few pixels), and nearly all within ``LEVEL_TOL`` of it."""
    dev = np.abs(row - float(np.median(row)))
    return not bool((dev >= DRAWING).any()) and float((dev <= LEVEL_TOL).mean()) >= ROW_SHARE


def _plain(row: np.ndarray, level: float, band_like_background: bool) -> bool:
    """A uniform row that is not part of the header: at another level than the band's, or at any
    level when the band is as light as the crops' background (its empty rows below the drawing
    cannot then be told from the image's own margin, and are left to the image)."""
    if not _uniform(row):
        return False
    return band_like_background or abs(float(np.median(row)) - level) > LEVEL_TOL
