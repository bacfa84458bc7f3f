"""An offline HTML contact sheet: a sample of classified particles, each beside its nearest gallery
particles. Images are embedded as base64 data URIs, so the one file opens anywhere without the data.
PNG, JPEG and GIF crops are embedded as they are; any other format Pillow reads (TIFF, BMP, 16-bit
...) is re-encoded as an 8-bit grayscale PNG, and a crop nothing can read shows as "unreadable"."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from xmodal.data.quarantine import DataError
from xmodal.data.schema import parquet_files
from xmodal.data.transforms import to_gray8

_MIME = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg", b"GIF8": "image/gif"}  # browsers show these

_STYLE = """
body { font-family: sans-serif; margin: 1em; background: #fafafa; }
table { border-collapse: collapse; }
td { border: 1px solid #ddd; padding: 4px; vertical-align: top; text-align: center; font-size: 12px; }
td.query { background: #eef; }
td.unknown { background: #fee; }
img { width: 96px; height: 96px; object-fit: contain; background: #000; display: block; margin: auto; }
.missing { width: 96px; height: 96px; line-height: 96px; background: #ccc; color: #555; }
"""


def image_uri(data: bytes) -> str | None:
    """A data URI for encoded image bytes: PNG, JPEG and GIF (by their magic numbers) as they are,
    anything else Pillow reads as an 8-bit grayscale PNG; None when Pillow cannot read it."""
    mime = next((m for magic, m in _MIME.items() if data.startswith(magic)), None)
    if mime is None:
        try:
            with Image.open(io.BytesIO(data)) as im:
                png = io.BytesIO()
                to_gray8(im).save(png, format="PNG")
        except (OSError, ValueError, Image.DecompressionBombError):
            return None
        mime, data = "image/png", png.getvalue()
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def read_images(particles: str | Path, wanted: Iterable[str]) -> dict[str, bytes | None]:
    """Encoded images of the ``wanted`` particle ids found in a particles Parquet folder, shard by
    shard (None: the particle is there without an image); ids not found are not in the result."""
    value_set = pa.array(sorted(set(wanted)), type=pa.string())
    found: dict[str, bytes | None] = {}
    for f in parquet_files(particles):
        if len(found) == len(value_set):
            break
        mask = pc.is_in(pq.read_table(f, columns=["particle_id"]).column("particle_id"), value_set=value_set)
        if not pc.any(mask).as_py():
            continue
        rows = pq.read_table(f, columns=["particle_id", "image"]).filter(mask)
        for pid, img in zip(rows.column("particle_id").to_pylist(), rows.column("image").to_pylist()):
            found[pid] = img
    return found


def sheet_images(
    particles: str | Path, wanted: Iterable[str], option: str, role: str
) -> dict[str, bytes | None]:
    """``read_images`` for the sheet, which is worthless when the particles are not there (the
    wrong folder passed as ``option``): an error when none is found, a warning when some are not."""
    wanted = sorted(set(wanted))
    found = read_images(particles, wanted)
    missing = [pid for pid in wanted if pid not in found]
    if wanted and len(missing) == len(wanted):
        raise DataError(
            f"{option} {particles}: none of the {len(wanted)} {role} particles of the contact sheet is "
            f"there (e.g. {missing[0]}); pass the particle folder the {role} embeddings were made from "
            "(their `xmodal embed --data`)"
        )
    if missing:
        print(
            f"[xmodal] warning: {len(missing)} of {len(wanted)} {role} particles of the contact sheet "
            f"are not in {option} {particles} (e.g. {missing[0]}); they show as 'not found'"
        )
    return found


def _cell(pid: str, images: dict[str, bytes | None], caption: str, cls: str = "") -> str:
    img = images.get(pid)
    uri = image_uri(img) if img else None
    if uri:
        body = f'<img src="{uri}" alt="{html.escape(pid)}">'
    else:
        text = "unreadable image" if img else "no image" if pid in images else "not found"
        body = f'<div class="missing">{text}</div>'
    return f'<td class="{cls}">{body}<div>{html.escape(pid)}</div><div>{caption}</div></td>'


def contact_sheet(
    sample: pd.DataFrame,
    query_images: dict[str, bytes | None],
    gallery_images: dict[str, bytes | None],
    out: str | Path,
    title: str = "xmodal classification",
) -> Path:
    """Write the sheet: one table row per sampled prediction (columns of ``predictions.parquet``)."""
    rows = []
    for p in sample.itertuples(index=False):
        unknown = p.prediction == "unknown"
        caption = (
            f"<b>{html.escape(str(p.prediction))}</b><br>best {html.escape(str(p.best_class))}"
            f"<br>score {p.score:.3f} conf {p.confidence:.2f}"
        )
        cells = [_cell(p.particle_id, query_images, caption, "query unknown" if unknown else "query")]
        for nid, nlab, nsim in zip(p.neighbour_ids, p.neighbour_labels, p.neighbour_scores):
            cells.append(_cell(nid, gallery_images, f"{html.escape(str(nlab))}<br>cos {nsim:.3f}"))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    doc = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{len(sample)} particles (left) with their nearest gallery particles.</p>"
        f"<table>{''.join(rows)}</table></body></html>"
    )
    path = Path(out)
    path.write_text(doc, encoding="utf-8")
    return path
