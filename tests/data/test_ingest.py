"""ingest(): reconciling report and quarantine log, idempotent re-runs, strict mode, shards, pool, formats."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from xmodal.data import runner as runner_module
from xmodal.data.ingest import ingest
from xmodal.data.quarantine import DataError
from xmodal.data.readers import detect_format

ULCO_DOMAIN = "R4_photos_flr16_2uls_10min_2022-09-14_12h28"
CEFAS_DOMAIN = "Pond_NA_2023-05-24_09h23_All_Imaged_Particles"


def test_report_reconciles_and_lists_every_quarantined_particle(
    rd: SimpleNamespace, realdata: Path, tmp_path: Path
) -> None:
    report = ingest(rd.ulco_prefix(realdata).parent, tmp_path, quiet=True)
    saved = json.loads((tmp_path / "ingest_report.json").read_text())
    assert (saved["seen"], saved["ingested"], saved["quarantined"]) == (9, 6, 3)
    assert saved["seen"] == saved["ingested"] + saved["quarantined"]
    assert saved["reasons"] == {"malformed_row": 2, "empty_image": 1} == report.reasons
    assert {e["item"].rsplit(":", 1)[1] for e in saved["examples"]["malformed_row"]} == {"4206", "10104"}
    d = saved["domains"][ULCO_DOMAIN]
    assert (d["ingested"], d["with_image"], d["profile_only"], len(d["shards"])) == (6, 2, 4, 1)
    assert pq.read_table(d["shards"][0]).num_rows == 6
    log = [json.loads(line) for line in (tmp_path / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(e["reason"] for e in log) == ["empty_image", "malformed_row", "malformed_row"]
    text = report.summary()
    assert "9 particles seen, 6 ingested (2 with image, 4 profile-only), 3 quarantined" in text
    assert "empty_image 1, malformed_row 2" in text


def test_rerun_is_idempotent_and_replaces_old_shards(
    rd: SimpleNamespace, realdata: Path, tmp_path: Path
) -> None:
    src = rd.cefas_prefix(realdata).parent
    ingest(src, tmp_path, quiet=True, max_shard_bytes=100_000)  # several small shards
    assert len(list((tmp_path / CEFAS_DOMAIN).glob("part-*.parquet"))) > 1
    ingest(src, tmp_path, quiet=True)
    first = {p.name: p.read_bytes() for p in (tmp_path / CEFAS_DOMAIN).glob("part-*.parquet")}
    ingest(src, tmp_path, quiet=True)
    second = {p.name: p.read_bytes() for p in (tmp_path / CEFAS_DOMAIN).glob("part-*.parquet")}
    assert list(first) == ["part-00000.parquet"] and first == second
    rows = rd.rows_by_id(tmp_path, [CEFAS_DOMAIN])  # asserts no duplicate particle ids
    assert len(rows) == 817
    assert not list(tmp_path.glob(".*ingest-tmp"))


def test_a_second_export_into_the_same_folder_keeps_the_first_ones_account(
    rd: SimpleNamespace, realdata: Path, tmp_path: Path
) -> None:
    ulco, cefas = rd.ulco_prefix(realdata).parent, rd.cefas_prefix(realdata).parent
    ingest(ulco, tmp_path, quiet=True)
    report = ingest(cefas, tmp_path, quiet=True)  # another domain into the same OUT
    saved = json.loads((tmp_path / "ingest_report.json").read_text())
    assert list(saved["domains"]) == [CEFAS_DOMAIN] and saved["quarantined"] == 0  # this run's counts
    kept = saved["earlier"][ULCO_DOMAIN]
    assert (kept["ingested"], kept["quarantined"], kept["src"]) == (6, 3, str(ulco))
    assert len(rd.quarantined(tmp_path)) == 3  # the first export's entries stay in the log
    assert f"{ULCO_DOMAIN}: 6 particles kept from an earlier ingest of {ulco}" in report.summary()
    again = ingest(cefas, tmp_path, quiet=True)  # kept through later runs too
    assert ULCO_DOMAIN in again.earlier and len(rd.quarantined(tmp_path)) == 3
    ingest(ulco, tmp_path, quiet=True)  # re-ingesting a domain replaces its entries, no duplicates
    assert len(rd.quarantined(tmp_path)) == 3
    replaced = ingest(cefas, tmp_path, domain=ULCO_DOMAIN, quiet=True)  # another export over ULCO's folder
    (note,) = replaced.domains[ULCO_DOMAIN].notes
    assert note.startswith(f"replaced {tmp_path / ULCO_DOMAIN}: it held 6 particles from")
    assert ULCO_DOMAIN not in replaced.earlier


def test_a_kept_sources_entries_are_matched_by_path_not_by_string_prefix(tmp_path: Path) -> None:
    """/d/LAB is kept while /d/LAB2 is re-ingested clean: LAB2's old entries must not be carried."""
    import shutil

    from xmodal.data.synth import synthesize

    synthesize(tmp_path / "syn", n_lab=10, n_sea=0, n_uto=0, seed=1, fmt="syke", image_size=16, header_px=0)
    d, out = tmp_path / "d", tmp_path / "out"
    shutil.copytree(tmp_path / "syn" / "LAB", d / "LAB")
    shutil.copytree(tmp_path / "syn" / "LAB", d / "LAB2")
    ann = d / "LAB2" / "annotations.csv"
    clean = ann.read_text()
    ann.write_text(clean + "images/missing.png,profiles/missing.csv,foo\n")  # one row quarantined
    ingest(d / "LAB", out, quiet=True, workers=1)
    ingest(d / "LAB2", out, quiet=True, workers=1)
    assert [e["file"] for e in _log(out)] == [str(d / "LAB2" / "profiles" / "missing.csv")]
    ann.write_text(clean)
    report = ingest(d / "LAB2", out, quiet=True, workers=1)
    assert "LAB" in report.earlier and report.quarantined == 0
    assert _log(out) == []


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]


def test_strict_fails_at_the_first_problem_and_keeps_previous_output(
    rd: SimpleNamespace, realdata: Path, tmp_path: Path
) -> None:
    src = rd.ulco_prefix(realdata).parent
    ingest(src, tmp_path, quiet=True)
    before = {p.name: p.read_bytes() for p in (tmp_path / ULCO_DOMAIN).iterdir()}
    with pytest.raises(DataError) as e:
        ingest(src, tmp_path, strict=True, quiet=True)
    msg = str(e.value)
    assert (
        "_Listmode.csv" in msg and f"{ULCO_DOMAIN}:" in msg and "malformed_row" in msg and "--strict" in msg
    )
    assert {p.name: p.read_bytes() for p in (tmp_path / ULCO_DOMAIN).iterdir()} == before
    assert len(rd.quarantined(tmp_path)) == 3  # the log and report of the last good run stay
    assert json.loads((tmp_path / "ingest_report.json").read_text())["quarantined"] == 3
    assert not list(tmp_path.glob(".*tmp"))
    report = ingest(
        realdata / rd.CEFAS / "derived" / "syke_layout", tmp_path / "clean", strict=True, quiet=True
    )
    assert report.ingested == 4  # strict passes clean data


def test_process_pool_gives_the_in_process_result(
    rd: SimpleNamespace, realdata: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = rd.cefas_prefix(realdata).parent
    serial = ingest(src, tmp_path / "serial", quiet=True, workers=1)
    monkeypatch.setattr(runner_module, "PARALLEL_MIN_PARTICLES", 0)
    monkeypatch.setattr(runner_module, "MEASURE_TASKS", 0)  # the pool from the first task
    pooled = ingest(src, tmp_path / "pool", quiet=True, workers=2)
    assert pooled.to_dict()["domains"][CEFAS_DOMAIN]["ingested"] == serial.ingested == 817
    a = pq.read_table(tmp_path / "serial" / CEFAS_DOMAIN)
    b = pq.read_table(tmp_path / "pool" / CEFAS_DOMAIN)
    assert a.equals(b)


def test_domain_override_and_bad_domain_names(rd: SimpleNamespace, realdata: Path, tmp_path: Path) -> None:
    report = ingest(rd.ulco_prefix(realdata).parent, tmp_path, domain="ulco", quiet=True)
    assert list(report.domains) == ["ulco"] and (tmp_path / "ulco" / "part-00000.parquet").is_file()
    assert {r["domain"] for r in pq.read_table(tmp_path / "ulco").to_pylist()} == {"ulco"}
    with pytest.raises(DataError, match="not a usable folder name"):
        ingest(rd.ulco_prefix(realdata).parent, tmp_path, domain="../x", quiet=True)


def test_channel_map_file_rescues_an_unknown_column(
    rd: SimpleNamespace, realdata: Path, tmp_path: Path
) -> None:
    prefix = rd.copy_export(rd.ulco_prefix(realdata), tmp_path / "src")
    rd.edit_lines(
        Path(f"{prefix}_Pulses.csv"), lambda ls: [ls[0].replace(b";FL Red;", b";Red Fluo;")] + ls[1:]
    )
    with pytest.raises(DataError) as e:
        ingest(prefix.parent, tmp_path / "out", quiet=True)
    assert "_Pulses.csv: no column for canonical channel(s) ['FL Red']" in str(e.value)
    assert "(not in the channel table: ['Red Fluo'])" in str(e.value)
    cmap = tmp_path / "channels.yaml"
    cmap.write_text("Red Fluo: FL Red\n")
    report = ingest(prefix.parent, tmp_path / "out", channel_map=cmap, quiet=True)
    assert report.ingested == 6
    assert report.domains[ULCO_DOMAIN].channels[0]["mapping"]["FL Red"] == "Red Fluo"
    ingest(prefix.parent, tmp_path / "out", channel_map={"Red Fluo": "FL Red"}, quiet=True)
    saved = json.loads((tmp_path / "out" / "ingest_report.json").read_text())
    assert saved["options"]["channel_map"] == {"Red Fluo": "FL Red"} and saved["ingested"] == 6
    Path(f"{prefix}_Listmode.csv").unlink()
    with pytest.raises(DataError, match="_Listmode.csv: listmode file missing"):
        ingest(prefix.parent, tmp_path / "out", channel_map=cmap, quiet=True)


def test_format_detection(rd: SimpleNamespace, realdata: Path, tmp_path: Path) -> None:
    assert detect_format(rd.cefas_prefix(realdata).parent) == "cytoclus"
    assert detect_format(Path(f"{rd.cefas_prefix(realdata)}_Pulses.csv")) == "cytoclus"
    assert detect_format(realdata / rd.CEFAS / "derived" / "syke_layout") == "syke"
    assert detect_format(realdata / rd.BEADS / "derived") == "cyz2json"
    (tmp_path / "notes.json").write_text('{"not": "cyz2json"}')  # other JSON files are ignored
    with pytest.raises(DataError, match="cannot tell the format"):
        detect_format(tmp_path)
    with pytest.raises(DataError, match="no such file or folder"):
        detect_format(tmp_path / "absent")
    with pytest.raises(DataError, match="unknown format 'tiff'"):
        ingest(tmp_path, tmp_path / "out", fmt="tiff", quiet=True)


@pytest.mark.parametrize("class_column", ["Label", "Species", "Taxon", "Category"])
def test_annotations_with_semicolons_and_a_label_column_read_the_same(
    rd: SimpleNamespace, tmp_path: Path, class_column: str
) -> None:
    from xmodal.data.synth import synthesize

    synthesize(tmp_path / "syn", n_lab=24, n_sea=0, n_uto=0, seed=3, fmt="syke", image_size=24)
    lab = tmp_path / "syn" / "LAB"
    _, expected = rd.run(lab, tmp_path / "a")
    rows = list(csv.reader(io.StringIO((lab / "annotations.csv").read_text())))
    header = [class_column if h == "class" else h.capitalize() for h in rows[0]]
    with open(lab / "annotations.csv", "w", newline="", encoding="utf-8-sig") as f:
        csv.writer(f, delimiter=";").writerows([header, *rows[1:]])
    report, got = rd.run(lab, tmp_path / "b")
    assert report.quarantined == 0 and len(got) == len(expected) == 24
    assert {k: (r["label"], r["profile"]) for k, r in got.items()} == {
        k: (r["label"], r["profile"]) for k, r in expected.items()
    }
    assert len({r["label"] for r in got.values()}) > 1
