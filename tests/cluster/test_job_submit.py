"""The user's cluster path, end to end on a private local head node: ``ray job submit`` of
``python -m xmodal pretrain`` (a training worker is killed mid-run: the job still succeeds, resumed
from its last checkpoint), then ``xmodal embed`` and ``xmodal benchmark`` jobs on its checkpoint.

Run storage is a ``file://`` URI outside the job's working directory (Ray unpacks the uploaded
repository into its own temp dir), so every artifact has to travel through pyarrow filesystems
as it would to ``s3://``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from xmodal.train.checkpoint import load_checkpoint, resolve_checkpoint

pytestmark = pytest.mark.slow
EPOCHS = 3  # the kill lands in epoch 2 however fast the epochs run


def pretrain_entrypoint(data: Path, storage: str, name: str) -> list[str]:
    sets = {
        "data.train": data / "UTO",
        "data.val": data / "LAB",
        "data.image_size": 24,
        "data.profile_length": 32,
        "data.val_max_particles": 160,
        "model.embed_dim": 32,
        "optim.epochs": EPOCHS,
        "optim.batch_size": 64,
        "train.storage_path": storage,
        "train.checkpoint_every": 1,
        "train.log_every": 2,
        "train.max_failures": 2,
        "eval.val_n": 2,
    }
    args = ["python", "-m", "xmodal", "pretrain", "--config", "configs/laptop.yaml", "--name", name]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


@pytest.fixture(scope="module")
def pretrain_job(head, tiny_data, tmp_path_factory, faults):
    """A pretraining job whose worker is killed after the first checkpoint."""
    storage = tmp_path_factory.mktemp("storage")
    run_dir = storage / "runs" / "jobrun"
    t0 = time.monotonic()
    job = head.submit("pretrain-1", *pretrain_entrypoint(tiny_data, f"file://{storage}/runs", "jobrun"))
    head.wait_for_checkpoint(job, run_dir)
    head.kill_train_worker()
    killed_after = faults.epoch_records(run_dir)
    print(f"[pretrain] worker killed after epochs {killed_after}, {time.monotonic() - t0:.0f}s in")
    logs = head.wait_succeeded(job)
    print(f"[pretrain] job succeeded after {time.monotonic() - t0:.0f}s")
    return run_dir, logs, killed_after


def test_pretrain_job_survives_a_killed_worker(pretrain_job, faults):
    run_dir, logs, killed_after = pretrain_job
    assert 1 <= len(killed_after) < EPOCHS, f"the worker was killed too late to matter: {killed_after}"
    assert "resuming from epoch" in logs, logs[-5000:]
    epochs = faults.epoch_records(run_dir)
    assert sorted(set(epochs)) == list(range(1, EPOCHS + 1)) and epochs[-1] == EPOCHS, epochs
    assert epochs.count(1) == 1, f"epoch 1 was trained again: the run restarted instead of resuming {epochs}"


def test_pretrain_job_artifacts_reach_storage(pretrain_job):
    run_dir, logs, _ = pretrain_job
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_checkpoint"].startswith(f"file://{run_dir}/checkpoint_"), summary
    state = load_checkpoint(resolve_checkpoint(run_dir))  # torch.load(weights_only=True) inside
    assert state["epoch"] == EPOCHS and 0 <= state["metrics"]["val_score"] <= 1
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) >= 2, "one event file per rank-0 life"
    assert "pretraining finished" in logs and "jobrun" in logs


def test_embed_and_benchmark_jobs_on_the_checkpoint(head, pretrain_job, tiny_data, tmp_path):
    run_dir, _, _ = pretrain_job
    emb, bench = tmp_path / "emb", tmp_path / "bench"
    embed = [
        "python",
        "-m",
        "xmodal",
        "embed",
        "--checkpoint",
        str(run_dir),
        "--data",
        str(tiny_data / "LAB"),
    ]
    head.wait_succeeded(head.submit("embed-1", *embed, "--out", str(emb), "--batch-size", "64"))
    combos = ["I-I", "P-P", "I+P-I+P"]
    bench_cmd = ["python", "-m", "xmodal", "benchmark", "--embeddings", str(emb), "--out", str(bench)]
    logs = head.wait_succeeded(
        head.submit("benchmark-1", *bench_cmd, "--combos", *combos, "--n", "1", "2", "--repeats", "2")
    )
    md = (bench / "results.md").read_text()
    assert all(c in md for c in combos), md
    assert (bench / "results.json").exists() and (bench / "accuracy_vs_gallery.png").exists()
    assert "I+P-I+P" in logs
