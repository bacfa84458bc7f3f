"""``xmodal index build|search|info`` and ``xmodal classify`` through the command line parser."""

from __future__ import annotations

import json

import pandas as pd

from xmodal.cli import main
from xmodal.eval.embeddings import write_embeddings


def test_index_and_classify_commands(ix, tmp_path, capsys) -> None:
    centre = ix.centres(8, 16, seed=1)
    labels = [f"sp{i}" for i in range(6)]
    gallery = ix.clustered_set(centre[:6], labels, per_class=10, noise=1.0, seed=2, prefix="G")
    ix.write_shards(gallery, tmp_path / "gallery", shards=2)
    new = ix.clustered_set(centre, [None] * 8, per_class=5, noise=1.0, seed=3, prefix="Q")
    write_embeddings(new, tmp_path / "new")
    idx, cls = str(tmp_path / "idx"), str(tmp_path / "cls")

    def xmodal(*words: str) -> int:
        return main([str(w) for w in words])

    assert xmodal("index", "build", "--embeddings", tmp_path / "gallery", "--out", idx,
                  "--exact-max", 0, "--approx", "hnsw", "--holdout", 20, "--no-gpu") == 0  # fmt: skip
    assert json.loads((tmp_path / "idx" / "meta.json").read_text())["index_type"] == "hnsw"
    capsys.readouterr()
    assert xmodal("index", "info", "--index", idx) == 0
    info = capsys.readouterr().out
    assert "hnsw" in info and "120 fused rows of 60 particles, dim 16" in info

    assert xmodal("index", "search", "--index", idx, "--ids", "G0", "G7", "--k", 4,
                  "--out", tmp_path / "hits.csv") == 0  # fmt: skip
    hits = pd.read_csv(tmp_path / "hits.csv")
    assert len(hits) == 8 and set(hits["query_id"]) == {"G0", "G7"}
    assert "G0" not in set(hits["neighbour_id"][:4])  # a stored particle is not its own neighbour
    assert xmodal("index", "search", "--index", idx, "--embeddings", tmp_path / "new", "--query-kind", "image",
                  "--out", tmp_path / "hits.parquet") == 0  # fmt: skip
    assert len(pd.read_parquet(tmp_path / "hits.parquet")) == 40 * 10
    # neither (or both) query sources: one clear line, exit status 2
    assert xmodal("index", "search", "--index", idx) == 2
    assert "give either --ids" in capsys.readouterr().err

    assert xmodal("classify", "--gallery", idx, "--queries", tmp_path / "new", "--out", cls,
                  "--accept", 0.9, "--volume-ml", 4) == 0  # fmt: skip
    summary = json.loads((tmp_path / "cls" / "summary.json").read_text())
    assert summary["particles"] == 40 and summary["calibration"]["accept_target"] == 0.9
    assert "per_ml" in pd.read_csv(tmp_path / "cls" / "counts.csv").columns


def test_user_errors_print_one_line(ix, tmp_path, capsys) -> None:
    """Bad arguments and unusable data end with exit status 2 and one line naming the problem, not a
    traceback (and nothing half-written where the check can come first)."""
    centre = ix.centres(3, 8, seed=1)
    gallery = ix.clustered_set(centre, ["a", "b", "c"], per_class=4, noise=0.5, seed=2, prefix="G")
    write_embeddings(gallery, tmp_path / "gallery")
    unlabelled = ix.clustered_set(centre, [None] * 3, per_class=2, noise=0.5, seed=3, prefix="Q")
    write_embeddings(unlabelled, tmp_path / "new")
    idx = tmp_path / "idx"
    assert main(["index", "build", "--embeddings", str(tmp_path / "gallery"), "--out", str(idx)]) == 0
    classify = ["classify", "--gallery", str(tmp_path / "gallery"), "--queries", str(tmp_path / "new")]
    search = ["index", "search", "--index", str(idx)]
    cases = [
        ([*classify, "--out", str(tmp_path / "o1"), "--accept", "1.5"], "--accept 1.5: must be a fraction"),
        ([*classify, "--out", str(tmp_path / "o2"), "--k", "0"], "--k 0"),
        (["classify", "--gallery", str(tmp_path / "new"), "--queries", str(tmp_path / "new"),
          "--out", str(tmp_path / "o3")], "no labelled particles"),
        ([*search, "--ids", "G0", "--out", str(tmp_path / "x.txt")], "name a .csv or .parquet"),
        ([*search, "--ids", "nope"], "not in the index"),
        ([*search, "--ids", "G0", "--k", "0"], "--k 0"),
        ([*search, "--embeddings", str(tmp_path / "new"), "--k", "0"], "--k 0"),
    ]  # fmt: skip
    capsys.readouterr()
    for argv, message in cases:
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.err.count("\n") == 1 and message in captured.err and "Traceback" not in captured.err
        assert captured.out == ""
    assert not (tmp_path / "o1").exists() and not (tmp_path / "x.txt").exists()
