"""A real sweep on the session's local Ray cluster, through the CLI as a user runs it: 3 trials of
Tune-over-Train on tiny synthetic data, the driver killed after 1 finished trial while the second
has a checkpoint, the sweep resumed to 3 without repeating it (the second continues from its
checkpoint, a third is newly sampled), the report, and the best config re-trained with the same
seed. Three trials are the fewest that cover all of it; each costs ~40 s here. ASHA's first rung is
the last epoch (grace period 2): a trial it stopped at its first checkpoint would finish before the
test could interrupt it, and with every trial stopped so the sweep could end before any interrupt.
Should the second trial still finish unseen, the third is interrupted and the resume asks for one
trial more, so that one is still newly sampled.

Reproduction tolerance: the augmentations draw from a per-process seed and Ray Data streams batches
in no fixed order, so the pipeline promises statistical, not bitwise, reproduction. This sweep trains
without augmentation; the same config and seed must then give the trial's validation score within
REPRO_TOL (absolute accuracy; measured differences were 0.012-0.015 on this 160-particle set, where
one query is worth ~0.007)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from xmodal.config import load_config
from xmodal.tune.report import epoch_curve, storage_url
from xmodal.tune.runner import STATE_FILE

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
REPRO_TOL = 0.05
NO_AUGMENT = {
    f"data.augment.{k}": 0.0
    for k in ("flip", "resized_crop", "brightness", "contrast", "amplitude", "band_drop", "temporal_crop")
}
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


def cli(args: list[str], log: Path) -> subprocess.Popen:
    """``xmodal`` in a subprocess that joins the session cluster through RAY_ADDRESS (tests/conftest.py),
    its output in ``log`` (a pipe nobody reads would block the driver once full)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "xmodal", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )


def trials_by_state(sweep: Path) -> dict[str, list[int]]:
    """Trial numbers by state, read from the study's SQLite file read-only: opening it through
    Optuna while the driver creates it would race the driver's schema set-up (both insert the
    schema version: "UNIQUE constraint failed: alembic_version")."""
    db = sweep / "optuna.db"
    if not db.exists():
        return {}
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
            rows = con.execute("SELECT number, state FROM trials").fetchall()
    except sqlite3.OperationalError:  # no tables yet, or locked by a writer for > 5 s
        return {}
    out: dict[str, list[int]] = {}
    for number, state in rows:
        out.setdefault(state, []).append(number)
    return out


def test_sweep_interrupted_resumed_reported_and_best_reproduced(
    ray_session, faults, tiny_data, tmp_path, tune_helpers
):
    from xmodal.train.checkpoint import load_checkpoint
    from xmodal.train.trainer import pretrain

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space_file = tune_helpers.write_space(
        tmp_path / "tiny.yaml",
        tune_helpers.tiny_space(tiny_data, fixed=NO_AUGMENT, search={"grace_period": 2}),
    )
    sweeps = tmp_path / "sweeps"
    sweep = sweeps / "tiny"
    args = ["tune", "--space", str(space_file), "--storage-path", str(sweeps)]

    first = cli([*args, "--trials", "3"], tmp_path / "first.log")
    t0 = time.time()
    while True:  # interrupt once 1 trial has finished and the next one has a registered checkpoint
        states = trials_by_state(sweep)
        if len(states.get("COMPLETE", [])) >= 1 and any(
            faults.registered_epoch(sweep / "runs" / f"trial-{n:04d}") >= 1 for n in states.get("RUNNING", [])
        ):
            break
        assert first.poll() is None, f"the sweep ended early:\n{(tmp_path / 'first.log').read_text()[-5000:]}"
        assert time.time() - t0 < 1800, "2 trials did not run within 30 min (hang guard)"
        time.sleep(0.5)
    first.send_signal(signal.SIGKILL)  # the driver dies without any chance to clean up
    first.wait()
    before = optuna.load_study(study_name="tiny", storage=storage_url(sweep))
    done_before = {t.number: t for t in before.get_trials(states=FINISHED)}
    interrupted = {t.number: t for t in before.get_trials(states=(optuna.trial.TrialState.RUNNING,))}
    assert 1 <= len(done_before) <= 2 and len(interrupted) == 1, (done_before, interrupted)
    total = len(done_before) + 2  # the interrupted trial, continued, and one newly sampled

    resumed = cli([*args, "--trials", str(total), "--resume"], tmp_path / "resumed.log")
    resumed.wait(timeout=1800)
    out = (tmp_path / "resumed.log").read_text()
    assert resumed.returncode == 0, out[-5000:]
    print("\n".join(line for line in out.splitlines() if line.startswith("[xmodal] trial")))
    assert "was interrupted; queued again" in out and "best trial:" in out

    study = optuna.load_study(study_name="tiny", storage=storage_url(sweep))
    state = json.loads((sweep / STATE_FILE).read_text())
    assert state["interrupted"] == list(interrupted)
    finished = [t for t in study.get_trials(states=FINISHED) if t.number not in interrupted]
    assert len(finished) == total, [(t.number, t.state.name) for t in study.trials]
    assert all(t.state == optuna.trial.TrialState.COMPLETE and t.value is not None for t in finished)
    # finished trials were not run again: their runs hold each epoch once, their records are unchanged
    for n, t in done_before.items():
        epochs = faults.epoch_records(sweep / "runs" / t.user_attrs["run"])
        assert epochs == sorted(set(epochs)), f"trial {n} trained an epoch twice: {epochs}"
        assert study.trials[n].value == t.value and study.trials[n].params == t.params
    # the interrupted trial was continued with its parameters and run folder, from its checkpoint:
    # its first epoch was not trained again
    (lost,) = interrupted.values()
    again = [t for t in finished if t.user_attrs["run"] == lost.user_attrs["run"]]
    assert len(again) == 1 and again[0].params == lost.params and again[0].number > lost.number
    epochs = faults.epoch_records(sweep / "runs" / lost.user_attrs["run"])
    assert epochs.count(1) == 1, f"the interrupted trial restarted instead of resuming: {epochs}"
    # reseeded sampler: the new trial is not a replay of the first trials' random draws
    new = [t for t in finished if t.number not in done_before and t is not again[0]]
    assert len(new) == 1
    assert all(new[0].params["optim.lr"] != t.params["optim.lr"] for t in done_before.values())
    # ASHA over epochs: scores arrive per epoch, no trial ran past the configured 2 epochs, and a
    # trial's value is the score of an epoch it recorded.
    for t in finished:
        curve = epoch_curve(sweep / "runs" / t.user_attrs["run"])
        assert 1 <= len(curve) <= 2 and any(score == pytest.approx(t.value) for _, score in curve), (curve, t)

    best = max(finished, key=lambda t: t.value)
    assert f"best trial:      {best.number} " in out
    for f in (
        "sweep_report.md",
        "trials.png",
        "importances.png",
        "val_curves.png",
        "best_trials/accuracy_vs_gallery.png",
    ):
        assert (sweep / f).exists(), f
    assert list((sweep / "runs" / best.user_attrs["run"] / "tb").glob("events.out.tfevents.*"))
    best_cfg = load_config(sweep / "best.yaml")
    ckpts = sorted((sweep / "runs" / best.user_attrs["run"]).glob("checkpoint_*/checkpoint.pt"))
    assert ckpts and best_cfg.to_dict() == load_checkpoint(ckpts[-1])["config"].to_dict()

    # the best config, re-trained with the same seed, reproduces the trial's score at the same epoch
    best_curve = dict(epoch_curve(sweep / "runs" / best.user_attrs["run"]))
    epoch = max(best_curve)
    cfg = load_config(sweep / "best.yaml", [f"train.storage_path={tmp_path / 'repro'}"])
    pretrain(cfg, name="repro")
    again_curve = dict(epoch_curve(tmp_path / "repro" / "repro"))
    print(f"best trial {best.number} val_score by epoch {best_curve}, re-trained {again_curve}")
    assert abs(again_curve[epoch] - best_curve[epoch]) <= REPRO_TOL
