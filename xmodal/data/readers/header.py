"""Finding a scale-bar header burnt into every crop of a source (``xmodal ingest --crop-header auto``).

The SYKE CytoSense images carry a 25-px band at the top with a scale bar and its label (the guide);
real crops from CytoClus or cyz2json carry none. Left in, the band is part of every image the
encoder sees, often half of a small particle's crop, and its height inflates the image-size
metadata. Measured on an independent generator that draws it: LAB I+P-I+P at n = 16 went from
84.8 % to 90.3 % once it was cropped (bench/RESULTS.md, "Scale-bar header").

The header is found as what no particle image can produce: the same pixels, row by row from the
top, in nearly every image of the source (drawn by software at a fixed place), with the structure
of a drawing (dark bar or text on a bright band). Rows of plain background are never the same in
that sense, because sensor noise and each crop's own background level differ. A flat band (a
noise-free synthetic background) is refused, so a source without a header is never cropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MIN_IMAGES = 8  # fewer readable images say nothing about a source
MAX_ROWS = 64  # a header this tall or taller is not a scale bar: refuse rather than crop particles
MIN_ROWS = 8
SHARE = 0.9  # of the sampled images must hold the same row
TOLERANCE = 1.5  # mean absolute difference (gray levels) from the row's median across images
MIN_RANGE = 96  # gray levels between the drawing's darkest and brightest pixels
MAX_WIDTH = 64  # columns compared, from the left edge, where the bar and its label sit


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
    (also when there are fewer than ``MIN_IMAGES`` to compare: see ``too_few_images``)."""
    imgs, width = _comparable(images)
    if width < MIN_ROWS or len(imgs) < MIN_IMAGES:
        return 0
    rows = 0
    for r in range(MAX_ROWS):
        # only images with content below row r: a header is never the whole crop
        have = [a[r, :width] for a in imgs if a.shape[0] > r + MIN_ROWS]
        if len(have) < MIN_IMAGES:
            break
        stack = np.stack(have).astype(np.float32)
        diff = np.abs(stack - np.median(stack, axis=0)).mean(axis=1)
        if (diff <= TOLERANCE).mean() < SHARE:
            break
        rows = r + 1
    if rows < MIN_ROWS or rows >= MAX_ROWS:
        return 0
    band = np.median(np.stack([a[:rows, :width] for a in imgs]).astype(np.float32), axis=0)
    return rows if float(band.max() - band.min()) >= MIN_RANGE else 0
