"""Reports (results.json / results.md / PNGs) and the benchmark entry point the CLI calls."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from xmodal.cli import main
from xmodal.data.quarantine import DataError
from xmodal.eval.benchmark import benchmark, named_paths
from xmodal.eval.embeddings import write_embeddings
from xmodal.eval.protocol import COMBOS, run_protocol
from xmodal.eval.report import markdown, write_report


def test_report_files_hold_every_number(ev, tmp_path: Path) -> None:
    es = ev.make_set(150, 4, seed=1)
    result = run_protocol(es, None, ["I-I", "I+P-I+P"], [1, 4], 3, 3, progress=False, name="xm")
    paths = write_report(result, tmp_path)
    data = json.loads(paths["json"].read_text())["results"][0]
    assert data["name"] == "xm" and data["mode"] == "single" and data["classes"] == result.classes
    assert len(data["cells"]) == 4
    for c in data["cells"]:
        cell = result.cell(c["combo"], c["n"], c["k"])
        assert c["accuracy"]["values"] == cell.accuracy
        assert c["accuracy"]["mean"] == pytest.approx(np.mean(cell.accuracy))
        assert c["f1"]["std"] == pytest.approx(np.std(cell.f1))
        assert np.array(c["confusion"]).sum() == sum(cell.n_queries)
        assert set(c["per_class_recall"]) == set(result.classes)
    md = paths["md"].read_text()
    cell = result.cell("I+P-I+P", 4)
    row = next(line for line in md.splitlines() if line.startswith("| I+P-I+P |"))
    assert f"{100 * cell.mean():.1f} ± {100 * cell.std():.1f}" in row
    assert "| gallery-query | n=1 | n=4 |" in md
    for name in ("accuracy_vs_gallery.png", "confusion_I-I.png", "confusion_I+P-I+P.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200


def test_benchmark_compares_models_in_one_table(ev, tmp_path: Path) -> None:
    write_embeddings(ev.make_set(160, 4, seed=1), tmp_path / "xmodal_emb")
    write_embeddings(ev.make_set(160, 4, seed=2, profile=False), tmp_path / "dino_emb")
    results = benchmark(
        [f"crossmodal={tmp_path / 'xmodal_emb'}", str(tmp_path / "dino_emb")],
        tmp_path / "out",
        gallery_sizes=[1, 2],
        repeats=2,
        progress=False,
    )
    assert [r.name for r in results] == ["crossmodal", "dino_emb"]
    assert results[0].combos == list(COMBOS)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| model | gallery-query | n=1 | n=2 |" in md
    assert "| dino_emb | P-P | – | – |" in md  # the image-only model has no profile cells
    assert "P-P: not evaluated: no eligible gallery particle (2 runs)" in md
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())["results"]) == 2


def test_benchmark_split_and_cross_domain(ev, tmp_path: Path) -> None:
    lab, sea = ev.make_set(120, 4, seed=3, domain="LAB"), ev.make_set(80, 4, seed=4, domain="SEA")
    write_embeddings(lab, tmp_path / "both")
    write_embeddings(sea, tmp_path / "both")
    cross = benchmark(
        tmp_path / "both",
        tmp_path / "o1",
        ["I-I"],
        [2],
        repeats=2,
        gallery_domain="LAB",
        query_domain="SEA",
        progress=False,
    )[0]
    assert (
        cross.mode == "split"
        and cross.counts["query_labelled"] == 80
        and cross.counts["gallery_labelled"] == 120
    )
    write_embeddings(lab, tmp_path / "lab")
    write_embeddings(sea, tmp_path / "sea")
    split = benchmark(
        {"m": tmp_path / "lab"},
        tmp_path / "o2",
        ["I-I"],
        [2],
        repeats=2,
        query_embeddings={"m": tmp_path / "sea"},
        progress=False,
    )[0]
    assert split.cell("I-I", 2).accuracy == cross.cell("I-I", 2).accuracy  # the same protocol either way
    # and the same through the command line's cross-domain flags
    argv = [
        "benchmark",
        "--embeddings",
        str(tmp_path / "both"),
        "--out",
        str(tmp_path / "o5"),
        "--combos",
        "I-I",
        "--n",
        "2",
        "--repeats",
        "2",
        "--gallery-domain",
        "LAB",
        "--query-domain",
        "SEA",
    ]
    assert main(argv) == 0
    cell = json.loads((tmp_path / "o5" / "results.json").read_text())["results"][0]["cells"][0]
    assert cell["accuracy"]["values"] == cross.cell("I-I", 2).accuracy
    with pytest.raises(ValueError, match="domains present: \\['LAB', 'SEA'\\]"):
        benchmark(tmp_path / "both", tmp_path / "o3", ["I-I"], [2], query_domain="UTO", progress=False)
    with pytest.raises(ValueError, match="one query set per model"):
        benchmark([tmp_path / "lab", tmp_path / "sea"], tmp_path / "o4", query_embeddings=tmp_path / "sea")


def test_named_paths(tmp_path: Path) -> None:
    (tmp_path / "a" / "emb").mkdir(parents=True)
    (tmp_path / "b" / "emb").mkdir(parents=True)
    names = named_paths([str(tmp_path / "a" / "emb"), str(tmp_path / "b" / "emb"), f"dino={tmp_path}"])
    assert list(names) == ["emb", "b/emb", "dino"]


def test_markdown_lists_each_k(ev) -> None:
    es = ev.make_set(80, 3, seed=5)
    result = run_protocol(es, None, ["I-I"], [2], [1, 3], 2, progress=False)
    md = markdown(result)
    assert "## Accuracy (%), k = 1" in md and "## Accuracy (%), k = 3" in md


def test_benchmark_user_errors_print_one_line(ev, tmp_path: Path, capsys) -> None:
    write_embeddings(ev.make_set(40, 3, seed=6, unlabelled=40), tmp_path / "unlabelled")
    write_embeddings(ev.make_set(40, 3, seed=7), tmp_path / "lab")
    base = ["benchmark", "--out", str(tmp_path / "out"), "--n", "1", "--repeats", "1", "--embeddings"]
    cases = [
        ([*base, str(tmp_path / "unlabelled")], "none of the 40 gallery particles is labelled"),
        ([*base, str(tmp_path / "lab"), "--gallery-domain", "SEA"], "no particles of gallery domain 'SEA'"),
        ([*base, str(tmp_path / "lab"), "--combos", "I-X"], "unknown combination 'I-X'"),
        ([*base, str(tmp_path / "lab"), "--folds", "1"], "need at least 2 folds"),
        ([*base, str(tmp_path / "nowhere")], "nowhere"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err
    with pytest.raises(SystemExit) as stop:  # argparse: usage and one error line
        main([*base, str(tmp_path / "lab"), "--k", "0"])
    assert stop.value.code == 2 and "expected a number >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_benchmark_pairs_each_gallery_with_queries_of_its_checkpoint(ev, tmp_path: Path, capsys) -> None:
    """Models side by side may differ (that is the comparison); a model's gallery and queries may not.
    A particle folder given for embeddings is refused, not benchmarked into empty tables."""
    lab, sea = ev.make_set(60, 3, seed=3, domain="LAB"), ev.make_set(40, 3, seed=4, domain="SEA")
    for model in ("m1", "m2"):
        write_embeddings(lab, tmp_path / model / "lab", checkpoint=f"/runs/{model}/checkpoint.pt")
        write_embeddings(sea, tmp_path / model / "sea", checkpoint=f"/runs/{model}/checkpoint.pt")
    kw = {"combos": ["I-I"], "gallery_sizes": [2], "repeats": 1, "progress": False}
    models = {"a": tmp_path / "m1" / "lab", "b": tmp_path / "m2" / "lab"}
    both = benchmark(models, tmp_path / "o1", query_embeddings={"a": tmp_path / "m1" / "sea",
                                                                 "b": tmp_path / "m2" / "sea"}, **kw)  # fmt: skip
    assert len(both) == 2
    with pytest.raises(DataError, match=r"m1/lab holds embeddings of checkpoint /runs/m1/checkpoint.pt but "
                       r".*m2/sea of /runs/m2/checkpoint.pt"):  # fmt: skip
        benchmark(
            [tmp_path / "m1" / "lab"], tmp_path / "o2", query_embeddings=[tmp_path / "m2" / "sea"], **kw
        )
    argv = ["benchmark", "--out", str(tmp_path / "o3"), "--n", "2", "--repeats", "1", "--combos", "I-I",
            "--embeddings", str(tmp_path / "m1" / "lab"), "--queries", str(tmp_path / "m2" / "sea")]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "embed both with the same checkpoint" in err

    (tmp_path / "data").mkdir()
    pq.write_table(
        pa.table({"particle_id": ["p"], "label": ["x"], "domain": ["LAB"], "image": [b"\x89PNG"]}),
        tmp_path / "data" / "part-00000.parquet",
    )
    with pytest.raises(DataError, match="data holds particles, not embeddings: run `xmodal embed"):
        benchmark(tmp_path / "data", tmp_path / "o4", **kw)
    assert not (tmp_path / "o4").exists()
