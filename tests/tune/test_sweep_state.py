"""Sweep bookkeeping without Ray: trials left RUNNING by a dead driver are failed and queued again
under their run name, finished trials are never counted twice, a sweep folder is only reused with
--resume and the same space and base config, and bad inputs stop the sweep before Ray starts."""

from __future__ import annotations

import json

import optuna
import pytest

from xmodal.config import ConfigError
from xmodal.tune.report import storage_url
from xmodal.tune.runner import STATE_FILE, DefineByRun, _load_state, finished_count, reconcile, run_sweep
from xmodal.tune.space import load_space


@pytest.fixture
def space(tmp_path, tiny_data, tune_helpers):
    return load_space(tune_helpers.write_space(tmp_path / "space.yaml", tune_helpers.tiny_space(tiny_data)))


def test_interrupted_trials_are_failed_and_queued_again_under_their_run(tmp_path, space, tune_helpers):
    study = tune_helpers.scored_study(space, storage_url(tmp_path), "s", n=2)
    define = DefineByRun(space)
    running = study.ask()  # the driver died while this trial ran
    assert define(running) == {"xmodal_run": "trial-0002"}
    values = space.decode(running.params)
    state = {"interrupted": []}

    reconcile(study, state)
    assert study.trials[2].state == optuna.trial.TrialState.FAIL and state["interrupted"] == [2]
    assert finished_count(study) == 2
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].user_attrs["resumes"] == "trial-0002"

    reconcile(study, state)  # idempotent: nothing is RUNNING any more
    assert state["interrupted"] == [2] and finished_count(study) == 2

    again = study.ask()
    assert define(again) == {"xmodal_run": "trial-0002"}, "the queued trial must continue the same run folder"
    assert space.decode(again.params) == values
    study.tell(again, 0.9)
    fresh = study.ask()
    assert define(fresh) == {"xmodal_run": "trial-0004"}
    study.tell(fresh, 0.1)
    assert finished_count(study) == 4


def test_a_trial_killed_before_it_was_named_keeps_its_run_name(tmp_path, space, tune_helpers):
    study = tune_helpers.scored_study(space, storage_url(tmp_path), "s", n=1)
    study.ask()  # the driver died between Optuna's ask and the define-by-run call
    state = {"interrupted": []}
    reconcile(study, state)
    again = study.ask()
    assert DefineByRun(space)(again) == {"xmodal_run": "trial-0001"}
    reconcile(study, state)  # killed again before this one finished: still the same run
    third = study.ask()
    assert DefineByRun(space)(third) == {"xmodal_run": "trial-0001"} and state["interrupted"] == [1, 2]
    study.tell(third, 0.5)
    assert finished_count(study) == 2, "the two interrupted attempts of trial-0001 are not finished"


def test_zero_trials_are_rejected_not_replaced_by_the_spaces_default(tmp_path, space):
    with pytest.raises(ConfigError, match="--trials must be >= 1, got 0"):
        run_sweep(space.path, trials=0, storage_path=tmp_path / "sw")
    assert not (tmp_path / "sw").exists()


def test_gpus_per_trial_are_checked_against_the_batch_size_before_ray_starts(tmp_path, space):
    """--gpus-per-trial 3 makes 3 workers per trial: the space's batch size 64 cannot be split."""
    with pytest.raises(ConfigError, match=r"base config .* optim.batch_size=64 must be divisible .* 3 x 1"):
        run_sweep(space.path, gpus_per_trial=3, storage_path=tmp_path / "sw")
    assert not (tmp_path / "sw").exists()


def test_sweep_folder_is_reused_only_to_resume_the_same_sweep(tmp_path, space, tune_helpers):
    base = space.base_dict()
    sweep = tmp_path / "sweeps" / "s"
    state = _load_state(sweep, space, base, resume=False)
    assert json.loads((sweep / STATE_FILE).read_text()) == state and state["base"] == base
    with pytest.raises(FileExistsError, match="pass --resume"):
        _load_state(sweep, space, base, resume=False)
    assert _load_state(sweep, space, base, resume=True) == state
    changed = dict(base, optim={**base["optim"], "epochs": 9})
    with pytest.raises(ConfigError, match=r"base config differs .*\['optim'\]"):
        _load_state(sweep, space, changed, resume=True)
    other = tune_helpers.tiny_space(tmp_path, trials=5)
    other_space = load_space(tune_helpers.write_space(tmp_path / "other.yaml", other))
    with pytest.raises(ConfigError, match="differs from the space"):
        _load_state(sweep, other_space, base, resume=True)


def test_inputs_are_checked_before_ray_starts(tmp_path, space, tune_helpers, tiny_data):
    path = space.path
    with pytest.raises(ConfigError, match="labelled validation set: set data.val"):
        run_sweep(path, overrides=["data.val="], storage_path=tmp_path / "sw")
    with pytest.raises(FileNotFoundError, match="data.train=.*nowhere.*not found"):
        run_sweep(path, overrides=[f"data.train={tmp_path / 'nowhere'}"], storage_path=tmp_path / "sw")
    with pytest.raises(ConfigError, match="give a folder"):
        run_sweep(path, storage_path="s3://bucket/sweeps")
    with pytest.raises(ConfigError, match="--concurrent must be >= 1, got 0"):
        run_sweep(path, trials=2, concurrent=0, storage_path=tmp_path / "sw")
    with pytest.raises(ConfigError, match=r"\['optim.lr'\] are searched"):
        run_sweep(path, overrides={"optim.lr": 0.1}, storage_path=tmp_path / "sw")
    assert not (tmp_path / "sw").exists(), "nothing is written for a sweep that cannot start"


def test_resume_of_a_finished_sweep_only_rewrites_the_report(tmp_path, space, tune_helpers):
    """With every asked-for trial finished, --resume runs nothing (no Ray) and reports the study."""
    sweep = tmp_path / "sweeps" / "s"
    _load_state(sweep, space, space.base_dict(), resume=False)
    tune_helpers.scored_study(space, storage_url(sweep), "s", n=3)
    result = run_sweep(space.path, trials=3, name="s", resume=True, storage_path=tmp_path / "sweeps")
    assert [t.number for t in result.trials] == [2, 1, 0] and result.best.number == 2
    assert result.best_config == sweep / "best.yaml" and (sweep / "sweep_report.md").exists()
    assert json.loads((sweep / STATE_FILE).read_text())["attempts"][-1]["done_before"] == 3
