"""The ``--html`` contact sheet: a sample of predictions with their nearest gallery images, embedded
as data URIs; every image decodes in headless Chromium, offline (skipped without /usr/bin/chromium)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import xmodal.index.classify as classify_module
from xmodal.data.synth import synthesize
from xmodal.eval.embeddings import EmbeddingSet, write_embeddings
from xmodal.index.classify import classify
from xmodal.index.html import image_uri

CHROMIUM = Path("/usr/bin/chromium")


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def _embeddings_for(particles: Path, centres: dict[str, np.ndarray], seed: int) -> EmbeddingSet:
    """Embeddings of the synthetic particles near their class centre (the model is not under test)."""
    table = pq.read_table(particles, columns=["particle_id", "label", "domain"])
    labels = np.asarray(table.column("label").to_pylist(), dtype=object)
    rng = np.random.default_rng(seed)
    n = len(labels)
    centre = np.stack([centres[c] for c in labels])
    image, profile = (
        centre + 0.3 * rng.normal(size=centre.shape),
        centre + 0.3 * rng.normal(size=centre.shape),
    )
    return EmbeddingSet(
        np.asarray(table.column("particle_id").to_pylist(), dtype=object),
        labels,
        np.asarray(table.column("domain").to_pylist(), dtype=object),
        image,
        np.ones(n, bool),
        profile,
        np.ones(n, bool),
    )


@pytest.fixture(scope="module")
def sheet(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sheet")
    summary = synthesize(root / "syn", n_lab=80, n_sea=40, n_uto=0, seed=3, fmt="parquet", image_size=32)
    rng = np.random.default_rng(0)
    centres = {c: rng.normal(size=16) for c in [*summary["species"], summary["detritus"]]}
    write_embeddings(_embeddings_for(root / "syn" / "LAB", centres, 1), root / "gallery")
    write_embeddings(_embeddings_for(root / "syn" / "SEA", centres, 2), root / "sea")
    out = classify(
        root / "gallery",
        root / "sea",
        root / "out",
        k=3,
        html=True,
        particles=root / "syn" / "SEA",
        gallery_particles=root / "syn" / "LAB",
        html_sample=10,
    )
    assert json.loads((root / "out" / "summary.json").read_text())["html"] == out["html"]
    return Path(out["html"])


def test_contact_sheet_embeds_every_image(sheet: Path) -> None:
    text = sheet.read_text()
    parser = _Images()
    parser.feed(text)
    assert len(parser.sources) == 10 * 4  # each sampled particle and its 3 nearest gallery particles
    assert all(s.startswith("data:image/png;base64,") for s in parser.sources)
    assert "http://" not in text and "https://" not in text and 'src="file' not in text  # offline
    assert len(re.findall(r"<tr>", text)) == 10


def _encoded(pixels: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def _decoded(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def test_formats_a_browser_cannot_show_become_png() -> None:
    """TIFF (8- and 16-bit, as CytoClus crops may be) and BMP are re-encoded as 8-bit PNG with the
    same pixels (16-bit scaled from the full range, as training sees them); browser formats pass
    through unchanged; bytes no decoder reads give None (the sheet shows "unreadable image")."""
    gray = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10) * 2
    for fmt in ("TIFF", "BMP"):
        np.testing.assert_array_equal(_decoded(image_uri(_encoded(gray, fmt))), gray)
    wide = (np.arange(6 * 5, dtype=np.uint16).reshape(6, 5) * 2000).astype(np.uint16)
    np.testing.assert_array_equal(
        _decoded(image_uri(_encoded(wide, "TIFF"))), np.rint(wide / 257.0).astype(np.uint8)
    )
    jpeg = b"\xff\xd8\xff\xe0rest"
    assert image_uri(jpeg) == "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    assert image_uri(b"RIFFxxxx") is None


def test_tiff_crops_make_a_sheet_and_the_summary_comes_first(tmp_path, monkeypatch) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2, 8))
    y = np.arange(20) % 2
    ids = [f"g{i}" for i in range(20)]
    write_embeddings(
        EmbeddingSet(ids, [f"c{c}" for c in y], ["LAB"] * 20, centres[y] + 0.1 * rng.normal(size=(20, 8)),
                     np.ones(20, bool), centres[y] + 0.1 * rng.normal(size=(20, 8)), np.ones(20, bool)),
        tmp_path / "g",
    )  # fmt: skip
    qids = ["q0", "q1", "q2"]
    write_embeddings(
        EmbeddingSet(qids, [None] * 3, ["SEA"] * 3, centres[[0, 1, 0]], np.ones(3, bool),
                     centres[[0, 1, 0]], np.ones(3, bool)),
        tmp_path / "q",
    )  # fmt: skip
    crop = _encoded(np.full((16, 16), 90, np.uint8), "TIFF")
    for name, pids, images in (("gp", ids, [crop] * 20), ("qp", qids, [crop, crop, b"not an image"])):
        (tmp_path / name).mkdir()
        table = pa.table({"particle_id": pids, "image": pa.array(images, pa.binary())})
        pq.write_table(table, tmp_path / name / "part-00000.parquet")
    kwargs = {"k": 3, "html": True, "particles": tmp_path / "qp", "gallery_particles": tmp_path / "gp"}
    out = classify(tmp_path / "g", tmp_path / "q", tmp_path / "out", **kwargs)
    parser = _Images()
    parser.feed(Path(out["html"]).read_text())
    assert len(parser.sources) == 3 * 4 - 1  # q2's crop is unreadable: its cell says so
    assert all((_decoded(s) == 90).all() for s in parser.sources)
    assert "unreadable image" in Path(out["html"]).read_text()
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["html"] == out["html"]

    def broken(*args, **kwargs):
        raise RuntimeError("sheet failed")

    monkeypatch.setattr(classify_module, "contact_sheet", broken)
    with pytest.raises(RuntimeError, match="sheet failed"):
        classify(tmp_path / "g", tmp_path / "q", tmp_path / "out2", **kwargs)
    assert json.loads((tmp_path / "out2" / "summary.json").read_text())["particles"] == 3


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="headless Chromium not installed (apt-get install chromium)"
)
def test_contact_sheet_renders_in_headless_chromium(sheet: Path, tmp_path: Path) -> None:
    probe = tmp_path / "probe.html"  # the sheet plus a script that reports how many images decoded
    probe.write_text(
        sheet.read_text().replace(
            "</body>",
            "<script>window.addEventListener('load', () => { const imgs = [...document.images];"
            " document.title = 'decoded ' + imgs.filter(i => i.complete && i.naturalWidth > 0).length"
            " + ' of ' + imgs.length; });</script></body>",
        )
    )
    profile = tmp_path / "chromium-profile"
    result = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    shutil.rmtree(profile, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "<title>decoded 40 of 40</title>" in result.stdout, result.stdout[:500]
