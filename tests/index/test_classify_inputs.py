"""What classify, index build and index search accept as input: embeddings of one checkpoint (not
particles, not another model's), particles lacking the query modality (not "unknown"), a volume."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xmodal.cli import main
from xmodal.config import ConfigError
from xmodal.data.quarantine import DataError
from xmodal.eval.embeddings import write_embeddings
from xmodal.index.build import BuildOptions, build_index
from xmodal.index.classify import classify
from xmodal.index.outputs import counts_frame
from xmodal.index.search import search_embeddings

KNOWN = [f"sp{i:02d}" for i in range(6)]
CK1, CK2 = "/runs/r1/checkpoint_1/checkpoint.pt", "/runs/r1/checkpoint_2/checkpoint.pt"


def _sets(ix):
    centre = ix.centres(6, 16, seed=21)
    gallery = ix.clustered_set(centre, KNOWN, per_class=6, noise=1.0, seed=1, prefix="G")
    queries = ix.clustered_set(centre, [None] * 6, per_class=3, noise=1.0, seed=2, prefix="Q", domain="SEA")
    return gallery, queries


def test_gallery_and_queries_of_different_checkpoints_are_refused(ix, tmp_path, capsys) -> None:
    gallery, queries = _sets(ix)
    write_embeddings(gallery, tmp_path / "gallery", checkpoint=CK1)
    write_embeddings(queries, tmp_path / "q1", checkpoint=CK1)
    write_embeddings(queries, tmp_path / "q2", checkpoint=CK2)
    write_embeddings(queries, tmp_path / "q_old")  # from before checkpoints were recorded: passes
    write_embeddings(queries, tmp_path / "q2_unhashed", checkpoint=CK2)  # no manifest: no hash
    (tmp_path / "gallery" / "_embed.json").write_text(
        json.dumps({"checkpoint": CK1, "checkpoint_sha256": "a1"})
    )
    (tmp_path / "q2" / "_embed.json").write_text(json.dumps({"checkpoint": CK2, "checkpoint_sha256": "b2"}))
    build_index(tmp_path / "gallery", tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["checkpoint"] == CK1 and meta["checkpoint_sha256"] == "a1"

    mixed = rf"holds embeddings of checkpoint {CK1} but .*q2 of {CK2}.*embed both with the same checkpoint"
    for g in ("gallery", "idx"):
        with pytest.raises(DataError, match=mixed):
            classify(tmp_path / g, tmp_path / "q2", tmp_path / f"out_{g}")
        assert not (tmp_path / f"out_{g}").exists()
        for q in ("q1", "q_old"):
            assert classify(tmp_path / g, tmp_path / q, tmp_path / f"{g}_{q}")["particles"] == 18
    with pytest.raises(DataError, match=mixed):
        search_embeddings(tmp_path / "idx", tmp_path / "q2")
    assert sum(len(f) for f in search_embeddings(tmp_path / "idx", tmp_path / "q1", k=2)) == 36
    # one hash known, paths differ (a run folder moved, or another checkpoint): it cannot tell, warns
    capsys.readouterr()
    assert classify(tmp_path / "idx", tmp_path / "q2_unhashed", tmp_path / "idx_unhashed")["particles"] == 18
    (warning,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert f"cannot tell whether {tmp_path / 'idx'} (checkpoint {CK1})" in warning
    assert f"{tmp_path / 'q2_unhashed'} (checkpoint {CK2})" in warning


def _particles(folder, ids, images=True):
    """A particle shard as ingest writes it (the columns the loaders look at)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(ids)
    table = pa.table(
        {
            "particle_id": list(ids),
            "label": [None] * n,
            "domain": ["SEA"] * n,
            "image": [_png() if images else None] * n,
            "profile": pa.array([[1.0, 2.0]] * n, type=pa.list_(pa.float32())),
        }
    )
    pq.write_table(table, folder / "part-00000.parquet")
    return folder


def _png() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.full((4, 4), 128, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_a_particle_folder_given_for_embeddings_is_refused(ix, tmp_path) -> None:
    gallery, queries = _sets(ix)
    write_embeddings(gallery, tmp_path / "gallery")
    data = _particles(tmp_path / "data" / "SEA", queries.particle_id)
    fix = rf"{data} holds particles, not embeddings: run `xmodal embed --checkpoint RUN --data {data} --out OUT`"
    with pytest.raises(DataError, match=fix):
        classify(tmp_path / "gallery", data, tmp_path / "out")
    with pytest.raises(DataError, match=fix):
        classify(data, tmp_path / "gallery", tmp_path / "out")
    with pytest.raises(DataError, match=fix):
        build_index(data, tmp_path / "idx")
    build_index(tmp_path / "gallery", tmp_path / "idx")
    with pytest.raises(DataError, match=fix):
        search_embeddings(tmp_path / "idx", data)
    assert not (tmp_path / "out").exists()


def test_particles_without_the_query_modality_are_not_unknown(ix, tmp_path, capsys) -> None:
    """Never searched, so neither a class nor a rejection: their own prediction, counted apart, out
    of counts.csv (and its per-mL figures) and out of the EcoTaxa file."""
    gallery, queries = _sets(ix)
    write_embeddings(gallery, tmp_path / "gallery")
    queries.image_valid[:5] = False  # profile only (as most of a real CytoSense export)
    queries.profile_valid[0] = False  # neither
    write_embeddings(queries, tmp_path / "q")
    summary = classify(
        tmp_path / "gallery", tmp_path / "q", tmp_path / "out", query_kind="image", volume_ml=2.0
    )
    out = tmp_path / "out"
    pred = pd.read_parquet(out / "predictions.parquet")
    no_image = pred["particle_id"].isin(queries.particle_id[:5])
    assert (pred.loc[no_image, "prediction"] == "no_image").all()
    assert (pred.loc[~no_image, "prediction"] != "no_image").all()
    assert summary["not_classified"] == {"no_image": 5} and summary["particles"] == 18
    assert summary["unknown"] == int((pred["prediction"] == "unknown").sum())
    counts = pd.read_csv(out / "counts.csv")
    assert "no_image" not in set(counts["class"]) and counts["count"].sum() == 13
    np.testing.assert_allclose(counts["fraction"].sum(), 1.0, atol=1e-5)
    np.testing.assert_allclose(counts["per_ml"], counts["count"] / 2.0, atol=1e-6)
    eco = pd.read_csv(out / "ecotaxa.tsv", sep="\t", skiprows=[1], keep_default_na=False)
    assert eco["object_id"].tolist() == pred.loc[~no_image, "particle_id"].tolist()
    printed = capsys.readouterr().out
    assert "classified 13 of 18 particles" in printed and "5 particles not classified: no image" in printed

    fused = classify(tmp_path / "gallery", tmp_path / "q", tmp_path / "fused", query_kind="fused")
    assert fused["not_classified"] == {"no_image_or_profile": 1}

    renamed = gallery.subset(np.arange(len(gallery)))
    renamed.label[renamed.label == "sp00"] = "no_image"
    write_embeddings(renamed, tmp_path / "bad_gallery")
    with pytest.raises(DataError, match="class named 'no_image'"):
        classify(tmp_path / "bad_gallery", tmp_path / "q", tmp_path / "bad")


def test_index_build_says_how_many_particles_lack_the_kind(ix, tmp_path, capsys) -> None:
    _, queries = _sets(ix)
    queries.image_valid[:5] = False
    write_embeddings(queries, tmp_path / "q")
    meta = build_index(tmp_path / "q", tmp_path / "idx", BuildOptions(kind="image"))
    assert meta["particles"] == 13 and meta["particles_left_out"] == 5
    assert "5 of 18 particles have no image embedding and are left out" in capsys.readouterr().out
    assert build_index(tmp_path / "q", tmp_path / "fused")["particles_left_out"] == 0


def test_volume_must_be_positive(ix, tmp_path, capsys) -> None:
    gallery, queries = _sets(ix)
    write_embeddings(gallery, tmp_path / "gallery")
    write_embeddings(queries, tmp_path / "q")
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="--volume-ml .*positive"):
            classify(tmp_path / "gallery", tmp_path / "q", tmp_path / "out", volume_ml=bad)
        with pytest.raises(ConfigError, match="positive"):
            counts_frame(Counter({"a": 1}), bad)
    assert not (tmp_path / "out").exists()
    argv = ["classify", "--gallery", str(tmp_path / "gallery"), "--queries", str(tmp_path / "q"),
            "--out", str(tmp_path / "out"), "--volume-ml", "-1"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--volume-ml -1.0: the sample volume must be a positive" in err
    assert "per_ml" in counts_frame(Counter({"a": 1}), 0.5).columns


def test_contact_sheet_needs_the_queries_particle_folder(ix, tmp_path, capsys) -> None:
    gallery, queries = _sets(ix)
    write_embeddings(gallery, tmp_path / "gallery")
    write_embeddings(queries, tmp_path / "q")
    lab = _particles(tmp_path / "LAB", gallery.particle_id)
    args = {"html": True, "gallery_particles": lab, "html_sample": 6}
    with pytest.raises(DataError, match=r"--particles .*LAB: none of the 6 query particles .* is there"):
        classify(tmp_path / "gallery", tmp_path / "q", tmp_path / "wrong", particles=lab, **args)
    sea = _particles(tmp_path / "SEA", queries.particle_id)
    with pytest.raises(DataError, match=r"--gallery-particles .*SEA: none of the \d+ gallery particles"):
        swapped = {**args, "particles": sea, "gallery_particles": sea}
        classify(tmp_path / "gallery", tmp_path / "q", tmp_path / "wrong", **swapped)

    some = _particles(tmp_path / "some", queries.particle_id[::2])  # half the queries
    summary = classify(tmp_path / "gallery", tmp_path / "q", tmp_path / "some_out", particles=some, **args)
    missing = open(summary["html"]).read().count(">not found<")  # query cells: every gallery one is there
    assert 0 < missing < 6
    printed = capsys.readouterr().out
    assert f"warning: {missing} of 6 query particles of the contact sheet are not in --particles" in printed
