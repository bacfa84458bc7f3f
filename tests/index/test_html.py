"""The ``--html`` contact sheet: a sample of predictions with their nearest gallery images, embedded
as data URIs; every image decodes in headless Chromium, offline (skipped without /usr/bin/chromium)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

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


def test_image_uri_rejects_unknown_formats() -> None:
    assert image_uri(b"\xff\xd8\xff\xe0rest").startswith("data:image/jpeg;base64,")
    with pytest.raises(ValueError, match="unknown image format"):
        image_uri(b"RIFFxxxx")


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
