"""Run artifacts written through pyarrow filesystems: a ``file://`` URI away from the working
directory, and pyarrow's in-memory filesystem, which shares no disk with this process at all (what an
object store is to a training worker)."""

from __future__ import annotations

import json
import os

import pyarrow.fs as pafs
import pytest

from xmodal.config import ConfigError
from xmodal.storage import DirectoryMirror, absolute, durable, join, read_bytes, resolve, write_text
from xmodal.train.metrics import MetricsLogger


def records(text: str) -> list[tuple[str, int]]:
    return [(r["kind"], r["step"]) for r in map(json.loads, text.splitlines())]


def test_join_and_absolute_keep_uris_and_anchor_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute("runs") == str(tmp_path / "runs")
    assert absolute("s3://bucket/runs") == "s3://bucket/runs"
    assert join("s3://bucket/runs/", "exp", "/summary.json") == "s3://bucket/runs/exp/summary.json"
    assert join(str(tmp_path), "a") == f"{tmp_path}/a"


def test_relative_storage_is_refused_inside_a_ray_job(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert durable("runs", "train.storage_path") == str(tmp_path / "runs")  # a local run: fine
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray's job supervisor sets
    with pytest.raises(ConfigError, match=r"train.storage_path=runs is a relative path.*/mnt/shared"):
        durable("runs", "train.storage_path")
    assert durable("/mnt/shared/runs", "train.storage_path") == "/mnt/shared/runs"
    assert durable("s3://b/runs", "train.storage_path") == "s3://b/runs"


def test_unknown_scheme_names_the_location_and_the_fix():
    with pytest.raises(ValueError, match=r"nosuch://x.*s3://BUCKET"):
        resolve("nosuch://x/runs")


def test_write_and_read_through_a_file_uri(tmp_path):
    uri = f"file://{tmp_path}/deep/er/summary.json"
    write_text(uri, '{"a": 1}')
    assert (tmp_path / "deep" / "er" / "summary.json").read_text() == '{"a": 1}'
    assert read_bytes(uri) == b'{"a": 1}'
    assert read_bytes(f"file://{tmp_path}/missing.json") is None


def test_mirror_sends_only_changed_files(tmp_path):
    fs = pafs._MockFileSystem()
    (tmp_path / "tb").mkdir()
    (tmp_path / "a.txt").write_text("1")
    (tmp_path / "tb" / "ev").write_bytes(b"xy")
    mirror = DirectoryMirror(tmp_path, "run", filesystem=fs)
    assert mirror.sync() == 2
    assert mirror.sync() == 0
    (tmp_path / "a.txt").write_text("12")
    assert mirror.sync() == 1
    assert read_bytes("run/a.txt", fs) == b"12" and read_bytes("run/tb/ev", fs) == b"xy"


def test_metrics_logger_writes_only_through_the_filesystem_and_resumes_history():
    """Rank 0 of a resumed run on another node: history comes from storage, appends go back there."""
    fs = pafs._MockFileSystem()
    log = MetricsLogger("store/run", filesystem=fs)
    staging = log._staging
    log.log("step", 1, {"loss": 2.0})
    assert read_bytes("store/run/metrics.jsonl", fs) is None, "a step record is synced lazily"
    log.log("epoch", 1, {"train_loss": 1.5, "val_combo": "I+P-I+P"})
    assert records(read_bytes("store/run/metrics.jsonl", fs).decode()) == [("step", 1), ("epoch", 1)]
    log.close()
    assert not staging.exists(), "the local staging folder is removed on close"

    # a fresh process (e.g. after a killed worker) continues the same file
    log2 = MetricsLogger("store/run", filesystem=fs)
    log2.log("epoch", 2, {"train_loss": 1.0})
    log2.close()
    assert records(read_bytes("store/run/metrics.jsonl", fs).decode()) == [
        ("step", 1),
        ("epoch", 1),
        ("epoch", 2),
    ]
    events = [
        f.path
        for f in fs.get_file_info(pafs.FileSelector("store/run/tb", recursive=True))
        if f.type == pafs.FileType.File
    ]
    assert len(events) == 2 and all("events.out.tfevents" in p for p in events), events


def test_metrics_logger_with_a_file_uri_away_from_the_working_directory(tmp_path, monkeypatch):
    work, store = tmp_path / "cwd", tmp_path / "store"
    work.mkdir()
    monkeypatch.chdir(work)
    log = MetricsLogger(f"file://{store}/run", sync_every_s=0.0)  # every record synced
    log.log("step", 1, {"loss": 2.0})
    assert records((store / "run" / "metrics.jsonl").read_text()) == [("step", 1)]
    log.close()
    assert list((store / "run" / "tb").glob("events.out.tfevents.*"))
    assert os.listdir(work) == [], "nothing is written relative to the working directory"
