"""The sweep driver: Ray Tune trials that each run the distributed pretraining (Ray Train), sampled
by Optuna's TPE and stopped early by ASHA, scored by the per-epoch gallery k-NN ``val_score``.

Sweep folder ``<storage_path>/<name>/``:
    optuna.db         the Optuna study (SQLite): ``optuna-dashboard sqlite:///<sweep>/optuna.db``
    sweep.json        the space, the base config and bookkeeping for ``--resume``
    runs/<trial>/     each trial's Ray Train run: checkpoints, metrics.jsonl, tb/ (TensorBoard)
    tune/attempt-K/   Ray Tune's experiment folder of each (re)start
    sweep_report.md, *.png, best.yaml    written at the end (``report.py``)

Resuming: the study is the record of what has run. Trials it holds as finished are never run again;
trials left RUNNING by a driver that died are marked failed and their parameters queued first, under
the same run name, so Ray Train picks the run up from its last checkpoint. The sampler is reseeded
with the number of trials so far (the same seed would replay the first trials' random draws).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xmodal.config import ConfigError
from xmodal.storage import durable
from xmodal.train.metrics import format_duration
from xmodal.tune.report import (
    RUNS,
    STUDY_FILE,
    SweepResult,
    dashboard_command,
    interrupted,
    run_name,
    storage_url,
    write_report,
)
from xmodal.tune.space import Space, load_space

METRIC = "val_score"
RUN_KEY = "xmodal_run"  # Tune config key carrying the trial's run folder name
STATE_FILE = "sweep.json"
TRIAL_MEMORY = 100 * 2**20  # Tune rejects an empty request; the trial driver only waits on Ray Train


def _trial(config: dict[str, Any], space: Space, base: dict[str, Any], runs_dir: str) -> None:
    """One Tune trial: the pretraining run for the sampled parameters, its epoch reports forwarded."""
    import ray.data
    from ray.tune.integration.ray_train import TuneReportCallback

    from xmodal.train.trainer import build_trainer

    # this actor's Ray Data context is its own: live bars from concurrent trials would interleave
    ray.data.DataContext.get_current().enable_progress_bars = False
    run = config[RUN_KEY]
    cfg = space.config(base, space.decode(config), where=f"sweep trial {run}")
    trainer, _ = build_trainer(cfg, run, callbacks=[TuneReportCallback()], storage_path=runs_dir)
    trainer.fit()


class DefineByRun:
    """OptunaSearch's space: samples the parameters and names the trial's run folder (a class, not
    a closure, because Tune pickles the searcher with plain pickle)."""

    def __init__(self, space: Space):
        self.space = space

    def __call__(self, trial: Any) -> dict[str, Any]:
        run = run_name(trial)
        trial.set_user_attr("run", run)  # first: a driver killed while sampling still leaves it
        self.space.suggest(trial)
        return {RUN_KEY: run}


def _local_data(base: dict[str, Any]) -> dict[str, Any]:
    """Absolute data paths (trials run in other working directories), checked before any trial."""
    data = base["data"]
    if not data["val"]:
        raise ConfigError(
            "a sweep scores trials by gallery k-NN accuracy on a labelled validation set: "
            "set data.val (the space's fixed: or --set data.val=PATH)"
        )
    for key in ("train", "val"):
        if "://" in data[key]:
            continue
        p = Path(data[key]).resolve()
        if not p.exists():
            raise FileNotFoundError(
                f"data.{key}={data[key]} not found (from {Path.cwd()}); make data with "
                "`xmodal synth OUT --format parquet` or `xmodal ingest`, or --set data."
                f"{key}=PATH"
            )
        data[key] = str(p)
    return base


def _load_state(sweep_dir: Path, space: Space, base: dict[str, Any], resume: bool) -> dict[str, Any]:
    state_file = sweep_dir / STATE_FILE
    if not state_file.exists():
        if (sweep_dir / STUDY_FILE).exists():
            raise FileExistsError(f"{sweep_dir} holds a study but no {STATE_FILE}; choose another --name")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "space_file": str(space.path),
            "space_text": space.text,
            "base": base,
            "attempts": [],
            "interrupted": [],
        }
        state_file.write_text(json.dumps(state, indent=1))
        return state
    state = json.loads(state_file.read_text())
    if not resume:
        raise FileExistsError(
            f"sweep {sweep_dir} exists: pass --resume to continue it, or choose another --name"
        )
    if state["space_text"] != space.text:
        raise ConfigError(
            f"--resume: {space.path} differs from the space sweep {sweep_dir.name} started with "
            f"({state['space_file']}); resume with that space, or start a new --name"
        )
    if state["base"] != base:
        changed = sorted(k for k in base if base[k] != state["base"].get(k))
        raise ConfigError(
            f"--resume: the base config differs from the one sweep {sweep_dir.name} started with "
            f"(sections {changed}); pass the same --config/--set, or start a new --name"
        )
    return state


def reconcile(study: Any, state: dict[str, Any]) -> None:
    """Trials a dead driver left RUNNING: failed in the study, their parameters queued again under
    the same run name (so ``report.interrupted`` tells them from failures; listed in ``state``)."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"resumes": run_name(t)})
        state["interrupted"].append(t.number)
        print(f"[xmodal] trial {t.number} was interrupted; queued again to continue its run", flush=True)


def finished_count(study: Any) -> int:
    """Trials that ran to their end (scored, stopped early, or failed), not counting interrupted ones."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    stopped = interrupted(trials)
    return sum(1 for t in trials if t.state in finished and t.number not in stopped)


def connect(address: str | None) -> None:
    """Join (or start) the cluster so that every worker of this job can reach the cluster's State API.

    Ray Train's placement-group cleaner, a detached actor, frees a trial's workers when ASHA stops
    the trial; it looks the cluster up with the State API, whose auto-detection fails when several
    Ray instances run on one host (it then never frees them, and the next trial waits forever for
    CPUs). ``init_ray`` names a given cluster in the workers' environment; a local cluster started
    here gets its dashboard (the State API server) named the same way before its processes start.
    """
    import ray

    from xmodal.runtime import init_ray

    if ray.is_initialized() or address or os.environ.get("RAY_ADDRESS"):
        init_ray(address)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    init_ray(None, dashboard_port=port)


def _progress_callback(space: Space, total: int, done_before: int):
    from ray.tune import Callback

    class Progress(Callback):
        """A line per started trial with its parameters, and per finished trial with the best so
        far, the rate and an ETA (Tune's own status tables are switched off: verbose=0)."""

        def __init__(self) -> None:
            self.t0, self.done, self.best = time.time(), done_before, (float("-inf"), "")

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            params = ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in space.decode(trial.config).items()
            )
            print(f"[xmodal] {trial.config[RUN_KEY]} started: {params}", flush=True)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._line(trial, "done")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._line(trial, f"FAILED (see {trial.error_file})")

        def _line(self, trial: Any, what: str) -> None:
            self.done += 1
            res = trial.last_result or {}
            score = res.get(METRIC)
            if isinstance(score, float) and score > self.best[0]:
                self.best = (score, trial.config[RUN_KEY])
            elapsed = time.time() - self.t0
            new = self.done - done_before
            eta = elapsed / new * (total - self.done)
            score_txt = f"{100 * score:.1f}%" if isinstance(score, float) else "no score"
            best_txt = f"{100 * self.best[0]:.1f}% ({self.best[1]})" if self.best[1] else "none yet"
            print(
                f"[xmodal] {trial.config[RUN_KEY]} {what}: {METRIC} {score_txt} after epoch "
                f"{res.get('epoch', 0)} | {self.done}/{total} trials | best {best_txt} | "
                f"{format_duration(elapsed / new)}/trial | ETA {format_duration(eta)}",
                flush=True,
            )

    return Progress()


def run_sweep(
    space_path: str | Path,
    trials: int | None = None,
    concurrent: int = 1,
    gpus_per_trial: int = 0,
    name: str | None = None,
    resume: bool = False,
    storage_path: str | Path = "sweeps",
    address: str | None = None,
    base_config: str | Path | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    curves_top: int = 3,
) -> SweepResult:
    """Run (or ``resume``) a sweep of ``trials`` trials in total over the space file; returns the
    best trial, its config (``best.yaml``) and checkpoint. Everything is validated before Ray starts."""
    import optuna

    space = load_space(space_path)
    trials = space.trials if trials is None else trials
    for flag, value, low in (
        ("--trials", trials, 1),
        ("--concurrent", concurrent, 1),
        ("--gpus-per-trial", gpus_per_trial, 0),
    ):
        if value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    if "://" in str(storage_path):
        raise ConfigError(
            f"sweep storage {storage_path}: give a folder (shared by all nodes on a cluster); the "
            "Optuna study is an SQLite file in it"
        )
    over = dict(overrides or {}) if isinstance(overrides, dict) else list(overrides or [])
    if gpus_per_trial:
        # one GPU per Ray Train worker: a trial is DDP over its GPUs
        extra = {"train.use_gpu": True, "train.num_workers": gpus_per_trial}
        over = (
            {**over, **extra} if isinstance(over, dict) else [*over, *(f"{k}={v}" for k, v in extra.items())]
        )
    base = _local_data(space.base_dict(base_config, over))
    space.validate(base)
    name = name or space.path.stem
    sweep_dir = Path(durable(storage_path, "--storage-path")) / name
    state = _load_state(sweep_dir, space, base, resume)

    storage = optuna.storages.RDBStorage(storage_url(sweep_dir))
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)
    reconcile(study, state)
    done = finished_count(study)
    remaining = trials - done
    attempt = len(state["attempts"])
    state["attempts"].append(
        {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "trials": trials, "done_before": done}
    )
    (sweep_dir / STATE_FILE).write_text(json.dumps(state, indent=1))
    if remaining > 0:
        plan = Plan(space, base, sweep_dir, name, trials, done, attempt)
        _tune(plan, storage, len(study.trials), concurrent, gpus_per_trial, address)
    else:
        print(f"[xmodal] sweep {name} already has {done} finished trials (asked for {trials})", flush=True)
    result = write_report(sweep_dir, study, space, base, curves_top=curves_top)
    finished = finished_count(study)
    if finished < trials:
        print(
            f"[xmodal] sweep {name} stopped with {finished}/{trials} trials finished; continue with "
            f"`xmodal tune --space {space.path} --name {name} --resume`",
            flush=True,
        )
    return result


@dataclass
class Plan:
    """One start of a sweep: ``total`` trials wanted, ``done`` already finished."""

    space: Space
    base: dict[str, Any]
    sweep_dir: Path
    name: str
    total: int
    done: int
    attempt: int  # numbers Tune's experiment folder: tune/attempt-<n>


def _tune(
    plan: Plan, storage: Any, n_before: int, concurrent: int, gpus_per_trial: int, address: str | None
) -> None:
    """Run the remaining trials with Tune; ``n_before`` trials (any state) are in the study already."""
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    connect(address)
    have = ray.cluster_resources().get("GPU", 0)
    if gpus_per_trial > have:
        print(
            f"[xmodal] warning: --gpus-per-trial {gpus_per_trial} but the cluster has {have:g} GPUs now; "
            "trials wait until an autoscaler adds them",
            flush=True,
        )
    space, sweep_dir, name = plan.space, plan.sweep_dir, plan.name
    remaining = plan.total - plan.done
    search = space.search
    sampler = optuna.samplers.TPESampler(
        seed=search["seed"] + n_before, n_startup_trials=search["startup_trials"]
    )
    searcher = OptunaSearch(
        DefineByRun(space), metric=METRIC, mode="max", sampler=sampler, study_name=name, storage=storage
    )
    scheduler = ASHAScheduler(
        time_attr="epoch",
        max_t=int(space.largest("optim.epochs", plan.base)),  # grace_period <= it: Space.validate
        grace_period=search["grace_period"],
        reduction_factor=search["reduction_factor"],
    )
    trainable = tune.with_resources(
        tune.with_parameters(_trial, space=space, base=plan.base, runs_dir=str(sweep_dir / RUNS)),
        {"cpu": 0, "memory": TRIAL_MEMORY},
    )
    print(
        f"[xmodal] sweep '{name}': {remaining} trial(s) to run ({plan.done}/{plan.total} finished), {concurrent} at a "
        f"time -> {sweep_dir}\n[xmodal] live view: {dashboard_command(sweep_dir)}",
        flush=True,
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=remaining,
            max_concurrent_trials=concurrent,
            trial_name_creator=lambda t: t.config[RUN_KEY],
            trial_dirname_creator=lambda t: t.config[RUN_KEY],
        ),
        run_config=tune.RunConfig(
            name=f"attempt-{plan.attempt}",
            storage_path=str(sweep_dir / "tune"),
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=[_progress_callback(space, plan.total, plan.done)],
            verbose=0,
        ),
    )
    tuner.fit()
