"""A sweep submitted with ``ray job submit`` runs on the cluster: Tune-over-Train inside the job's
driver, its trial's run and the Optuna study in the durable storage path, the report written.
Interrupting a sweep and resuming it (the interrupted trial continues from its checkpoint) is in
tests/tune/test_sweep_ray.py, on the session cluster: each sweep start costs ~40 s here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
EPOCHS = 1


def has_tune_command() -> bool:
    p = subprocess.run([sys.executable, "-m", "xmodal", "tune", "--help"], cwd=REPO, capture_output=True)
    return p.returncode == 0


def write_space(path: Path, data: Path) -> None:
    path.write_text(
        f"""base: {REPO / "configs" / "laptop.yaml"}
trials: 1
fixed:
  data.train: {data / "UTO"}
  data.val: {data / "LAB"}
  data.image_size: 24
  data.profile_length: 32
  data.val_max_particles: 160
  model.embed_dim: 32
  optim.epochs: {EPOCHS}
  optim.batch_size: 64
  train.num_workers: 1
  train.cpus_per_worker: 1
  train.max_failures: 0
  eval.val_n: 2
params:
  optim.lr: {{loguniform: [1.0e-3, 3.0e-3]}}
search:
  startup_trials: 1
  grace_period: {EPOCHS}
"""
    )


def test_sweep_job_runs_on_the_cluster(head, tiny_data, tmp_path, faults):
    if not has_tune_command():
        pytest.skip("`xmodal tune` is not a CLI command in this checkout")
    space, sweeps = tmp_path / "space.yaml", tmp_path / "sweeps"
    write_space(space, tiny_data)
    cmd = [
        "python",
        "-m",
        "xmodal",
        "tune",
        "--space",
        str(space),
        "--name",
        "s",
        "--storage-path",
        str(sweeps),
    ]
    logs = head.wait_succeeded(head.submit("sweep", *cmd))
    assert "best trial:      0 " in logs, logs[-5000:]
    assert faults.epoch_records(sweeps / "s" / "runs" / "trial-0000") == [EPOCHS]
    state = json.loads((sweeps / "s" / "sweep.json").read_text())
    assert len(state["attempts"]) == 1 and state["interrupted"] == [], state

    import optuna

    study = optuna.load_study(study_name="s", storage=f"sqlite:///{sweeps / 's' / 'optuna.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert [t.user_attrs["run"] for t in done] == ["trial-0000"], [(t.number, t.state) for t in study.trials]
    assert (sweeps / "s" / "sweep_report.md").exists() and (sweeps / "s" / "best.yaml").exists()
