"""A sweep submitted with ``ray job submit``, stopped with ``ray job stop`` while its trial is
mid-run, and resubmitted with ``--resume``: the trial continues its run from the last checkpoint
(epoch 1 is not trained twice) and the sweep finishes with the trial counted once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
EPOCHS = 3  # the stop lands before the last epoch however fast the epochs run


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
  train.checkpoint_every: 1
  train.max_failures: 0
  eval.val_n: 2
params:
  optim.lr: {{loguniform: [1.0e-3, 3.0e-3]}}
search:
  startup_trials: 1
  grace_period: {EPOCHS}
"""
    )


def test_sweep_job_stopped_then_resumed(head, tiny_data, tmp_path, faults):
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
    run_dir = sweeps / "s" / "runs" / "trial-0000"

    first = head.submit("sweep-1", *cmd)
    head.wait_for_checkpoint(first, run_dir)
    # the job API's stop (what `ray job stop` sends), without the seconds the CLI takes to start
    head.client().stop_job(first)
    assert head.wait(first) == "STOPPED"
    before = faults.epoch_records(run_dir)
    assert before and max(before) < EPOCHS, f"the trial finished before the stop: {before}"

    logs = head.wait_succeeded(head.submit("sweep-2", *cmd, "--resume"))
    assert "was interrupted; queued again" in logs, logs[-5000:]
    epochs = faults.epoch_records(run_dir)
    assert epochs.count(1) == 1 and epochs[-1] == EPOCHS, f"the trial restarted instead of resuming: {epochs}"
    state = json.loads((sweeps / "s" / "sweep.json").read_text())
    assert len(state["attempts"]) == 2 and state["interrupted"] == [0], state

    import optuna

    study = optuna.load_study(study_name="s", storage=f"sqlite:///{sweeps / 's' / 'optuna.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert [t.user_attrs["run"] for t in done] == ["trial-0000"], [(t.number, t.state) for t in study.trials]
    assert (sweeps / "s" / "sweep_report.md").exists()
