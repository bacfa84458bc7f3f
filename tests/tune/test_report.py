"""The sweep report from a persisted study and run folders (no Ray): trials sorted by score, the
best checkpoint chosen by its own val_score, best.yaml equal to the best trial's training config,
early-stopped trials marked, resumed runs' curves merged, and every figure written."""

from __future__ import annotations

import json
import os
import shlex

import pytest
import torch

from xmodal.config import load_config
from xmodal.tune.report import dashboard_command, epoch_curve, storage_url, write_report
from xmodal.tune.space import load_space

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(run_dir, curve, checkpoints=()):
    """metrics.jsonl epoch records and checkpoint folders as the training loop writes them."""
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for epoch, score in curve:
            f.write(json.dumps({"kind": "step", "step": 3, "loss": 1.0}) + "\n")
            f.write(json.dumps({"kind": "epoch", "step": epoch, "val_score": score}) + "\n")
    for i, (name, score) in enumerate(checkpoints):
        d = run_dir / name
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({"val_score": score, "epoch": i + 1}))
    return run_dir


def test_epoch_curve_keeps_a_resumed_runs_latest_record(tmp_path):
    run = fake_run(tmp_path / "r", [(1, 0.2), (2, 0.3), (2, 0.35), (3, 0.4)])
    assert epoch_curve(run) == [(1, 0.2), (2, 0.35), (3, 0.4)]
    assert epoch_curve(tmp_path / "missing") == []


@pytest.fixture
def sweep(tmp_path, tiny_data, tune_helpers):
    """A study of 4 scored trials (scores 0.2, 0.3, 0.4, 0.5) with run folders; the best trial has
    two checkpoints and a real one (a model saved with its config) holding the higher score."""
    from xmodal.models.build import build_model
    from xmodal.train.checkpoint import save_checkpoint

    space = load_space(tune_helpers.write_space(tmp_path / "space.yaml", tune_helpers.tiny_space(tiny_data)))
    base = space.base_dict()
    d = tmp_path / "sweeps" / "s"
    d.mkdir(parents=True)
    study = tune_helpers.scored_study(space, storage_url(d), "s", n=4)
    for t in study.trials[:3]:
        fake_run(
            d / "runs" / t.user_attrs["run"], [(1, t.value)] if t.number == 1 else [(1, 0.1), (2, t.value)]
        )
    best = study.trials[3]
    cfg = space.config(base, space.decode(best.params))
    run = fake_run(d / "runs" / best.user_attrs["run"], [(1, 0.55), (2, 0.5)], [("checkpoint_b", 0.5)])
    torch.manual_seed(0)
    save_checkpoint(
        run / "checkpoint_a",
        cfg,
        build_model(cfg),
        epoch=1,
        global_step=4,
        metrics={"val_score": 0.55, "epoch": 1},
    )
    os.utime(run / "checkpoint_a", (0, 0))  # older than checkpoint_b: the choice must go by score
    return d, study, space, base


def test_report_ranks_trials_and_writes_a_best_config_that_matches_the_checkpoint(sweep):
    from xmodal.train.checkpoint import load_checkpoint

    d, study, space, base = sweep
    result = write_report(d, study, space, base, curves_top=3)

    assert [t.number for t in result.trials] == [3, 2, 1, 0]
    assert [t.score for t in result.trials] == pytest.approx([0.5, 0.4, 0.3, 0.2])
    best = result.best
    assert best.number == 3 and best.checkpoint == d / "runs" / "trial-0003" / "checkpoint_a"
    assert best.checkpoint_score == pytest.approx(0.55) and best.epochs == 2

    written = load_config(result.best_config)
    assert written.to_dict() == load_checkpoint(best.checkpoint)["config"].to_dict()
    assert written.to_dict() == space.config(base, space.decode(study.trials[3].params)).to_dict()
    header = result.best_config.read_text().splitlines()[:3]
    assert "trial 3" in header[0] and "50.0%" in header[0] and str(best.checkpoint) in header[1]

    md = (d / "sweep_report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "trial-000" in line]
    assert [r.split(" | ")[1] for r in rows] == ["3", "2", "1", "0"]
    assert "stopped early" in rows[2] and "1/2" in rows[2], "trial 1 ran 1 of 2 epochs"
    assert all("stopped early" not in r for r in rows[:2] + rows[3:])
    assert "## Parameter importances" in md and "`optim.lr`" in md
    assert f"xmodal pretrain --config {result.best_config}" in md
    assert f"`{dashboard_command(d)}`" in md
    for png in ("trials.png", "importances.png", "val_curves.png", "best_trials/accuracy_vs_gallery.png"):
        assert (d / png).read_bytes()[:8] == PNG, png
    # the gallery curves cover only trials that have a checkpoint
    bench = (d / "best_trials" / "results.md").read_text()
    assert "trial-0003" in bench and "trial-0002" not in bench
    assert "sweep folder" in result.summary() and "trial-0003" in result.summary()


def test_report_of_a_study_without_scores(tmp_path, tiny_data, tune_helpers):
    import optuna

    space = load_space(tune_helpers.write_space(tmp_path / "space.yaml", tune_helpers.tiny_space(tiny_data)))
    d = tmp_path / "sw"
    d.mkdir()
    study = optuna.create_study(storage=storage_url(d), study_name="empty", direction="maximize")
    result = write_report(d, study, space, space.base_dict())
    assert result.best is None and result.best_config is None and not (d / "best.yaml").exists()
    assert "need at least 2 scored trials (have 0)" in (d / "sweep_report.md").read_text()


def test_interrupted_trials_are_reported_as_such_not_as_finished_failures(tmp_path, tiny_data, tune_helpers):
    """A trial interrupted twice (the driver died, --resume, died again) and then finished: one
    finished trial and two interrupted attempts, not three finished with two failures."""
    from xmodal.tune.runner import DefineByRun, finished_count, reconcile

    space = load_space(tune_helpers.write_space(tmp_path / "space.yaml", tune_helpers.tiny_space(tiny_data)))
    d = tmp_path / "sw"
    d.mkdir()
    study = tune_helpers.scored_study(space, storage_url(d), "s", n=2)
    define, state = DefineByRun(space), {"interrupted": []}
    define(study.ask())  # trial 2 runs when the driver dies
    reconcile(study, state)
    define(study.ask())  # trial 3 continues trial-0002 and is interrupted too
    reconcile(study, state)
    last = study.ask()
    assert define(last) == {"xmodal_run": "trial-0002"}
    study.tell(last, 0.9)

    result = write_report(d, study, space, space.base_dict())
    assert finished_count(study) == 3 and len(result.finished) == 3
    assert {t.number: t.state for t in result.trials} == {
        0: "COMPLETE",
        1: "COMPLETE",
        2: "INTERRUPTED",
        3: "INTERRUPTED",
        4: "COMPLETE",
    }
    assert "3 finished (3 with a score), 2 interrupted" in result.summary()
    md = (d / "sweep_report.md").read_text()
    assert "5 trials: 3 complete, 2 interrupted" in md and "fail" not in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and " interrupted " in line]
    assert [r.split(" | ")[1] for r in rows] == ["2", "3"]


def test_study_url_keeps_percent_hash_question_mark_and_space_in_the_sweep_path(tmp_path):
    import optuna

    d = tmp_path / "my sweeps%20a#b?c"
    d.mkdir()
    optuna.create_study(storage=storage_url(d), study_name="s")
    assert (d / "optuna.db").is_file() and len(list(tmp_path.rglob("*.db"))) == 1
    assert optuna.load_study(study_name="s", storage=storage_url(d)).study_name == "s"
    # the printed command runs as printed
    assert shlex.split(dashboard_command(d)) == ["optuna-dashboard", storage_url(d)]
