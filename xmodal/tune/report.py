"""The end-of-sweep report, built only from what the sweep persisted (the Optuna study and each
trial's run folder), so it can be rewritten at any time: ``sweep_report.md``, ``trials.png`` (trials
sorted by score), ``importances.png`` (Optuna's fANOVA), ``val_curves.png`` (per-epoch score of every
trial), ``best_trials/`` (the best trials' accuracy-vs-gallery curves and tables, via the evaluation
report) and ``best.yaml`` (the best trial's full config: ``xmodal pretrain --config best.yaml``).
"""

from __future__ import annotations

import json
import math
import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from xmodal.tune.space import Space

STUDY_FILE = "optuna.db"
RUNS = "runs"
BEST_CONFIG = "best.yaml"
REPORT = "sweep_report.md"


def storage_url(sweep_dir: Path) -> str:
    """The study's SQLAlchemy URL; built, not pasted, because SQLAlchemy reads %xx, # and ? in a
    URL's path (a folder named ``a%20b`` would otherwise open ``a b``)."""
    from sqlalchemy.engine import URL

    return URL.create("sqlite", database=str(sweep_dir / STUDY_FILE)).render_as_string(hide_password=False)


def dashboard_command(sweep_dir: Path) -> str:
    """The shell command that opens the study in optuna-dashboard (quoted for paths with spaces)."""
    return f"optuna-dashboard {shlex.quote(storage_url(sweep_dir))}"


def run_name(trial: Any) -> str:
    """The run folder (under ``runs/``) of an Optuna trial: its own, or the interrupted run it continues."""
    return trial.user_attrs.get("run") or trial.user_attrs.get("resumes") or f"trial-{trial.number:04d}"


def interrupted(trials: list[Any]) -> set[int]:
    """Numbers of the Optuna trials (in number order) a dead driver left running: ``reconcile``
    failed them and queued their parameters again, so a later trial continues their run
    (``resumes`` names it). They neither finished nor failed."""
    out: set[int] = set()
    continued: set[str] = set()  # runs that a later trial continues
    for t in reversed(trials):
        if t.state.name == "FAIL" and run_name(t) in continued:
            out.add(t.number)
        if "resumes" in t.user_attrs:
            continued.add(t.user_attrs["resumes"])
    return out


@dataclass
class TrialRow:
    number: int
    state: str  # Optuna's (COMPLETE incl. stopped early by ASHA, FAIL, PRUNED, RUNNING, WAITING) or
    # INTERRUPTED: a FAIL left by a dead driver, continued by a later trial (``interrupted``)
    score: float | None  # the last reported val_score (the objective Optuna holds)
    params: dict[str, Any]
    run: str
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, val_score)
    checkpoint: Path | None = None  # the run's best checkpoint (highest val_score)
    checkpoint_score: float | None = None

    @property
    def epochs(self) -> int:
        return self.curve[-1][0] if self.curve else 0


@dataclass
class SweepResult:
    sweep_dir: Path
    study_name: str
    trials: list[TrialRow]  # sorted by score, best first; trials without a score last
    best: TrialRow | None
    best_config: Path | None
    report: Path

    @property
    def finished(self) -> list[TrialRow]:
        return [t for t in self.trials if t.state in ("COMPLETE", "PRUNED", "FAIL")]

    def summary(self) -> str:
        stopped = sum(t.state == "INTERRUPTED" for t in self.trials)
        lines = [
            f"sweep folder:    {self.sweep_dir}",
            f"trials:          {len(self.finished)} finished "
            f"({sum(t.state == 'COMPLETE' for t in self.trials)} with a score)"
            + (f", {stopped} interrupted and continued by a later trial" if stopped else ""),
        ]
        if self.best is not None:
            params = ", ".join(f"{k}={_fmt(v)}" for k, v in self.best.params.items())
            lines += [
                f"best trial:      {self.best.number} ({self.best.run}) val_score {_pct(self.best.score)} "
                f"after {self.best.epochs} epoch(s): {params}",
                f"best checkpoint: {self.best.checkpoint}",
                f"best config:     {self.best_config}  (xmodal pretrain --config {self.best_config})",
            ]
        lines += [
            f"report:          {self.report}",
            f"dashboard:       {dashboard_command(self.sweep_dir)}",
            f"curves:          tensorboard --logdir {self.sweep_dir / RUNS}",
        ]
        return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def epoch_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(epoch, val_score) from the run's metrics.jsonl; a resumed run's later record of an epoch wins."""
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return []
    by_epoch: dict[int, float] = {}
    for line in f.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "epoch" and isinstance(rec.get("val_score"), (int, float)):
            by_epoch[int(rec["step"])] = float(rec["val_score"])
    return sorted(by_epoch.items())


def best_checkpoint(run_dir: Path) -> tuple[Path | None, float | None]:
    """The run's checkpoint with the highest val_score (from each checkpoint's metrics.json)."""
    best: tuple[Path | None, float | None] = (None, None)
    for m in sorted(run_dir.glob("checkpoint_*/metrics.json")):
        score = json.loads(m.read_text()).get("val_score")
        if isinstance(score, (int, float)) and (best[1] is None or score > best[1]):
            best = (m.parent, float(score))
    return best


def collect_trials(study: Any, space: Space, runs_dir: Path) -> list[TrialRow]:
    rows = []
    trials = study.get_trials(deepcopy=False)
    stopped = interrupted(trials)
    for t in trials:
        run = run_name(t)
        ckpt, ckpt_score = best_checkpoint(runs_dir / run)
        score = t.value if t.value is not None and math.isfinite(t.value) else None
        rows.append(
            TrialRow(
                t.number,
                "INTERRUPTED" if t.number in stopped else t.state.name,
                score,
                space.decode(t.params),
                run,
                epoch_curve(runs_dir / run),
                ckpt,
                ckpt_score,
            )
        )
    return sorted(rows, key=lambda r: (r.score is None, -(r.score or 0.0), r.number))


def importances(study: Any) -> tuple[dict[str, float], str]:
    """Optuna's fANOVA importances over the parameters every scored trial has, or why there are none."""
    import optuna

    scored = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    if len(scored) < 2:
        return {}, f"parameter importances need at least 2 scored trials (have {len(scored)})"
    try:
        with warnings.catch_warnings():
            # "few trials per regime" warnings: the report states that importances are rough
            warnings.simplefilter("ignore", UserWarning)
            return optuna.importance.get_param_importances(study), ""
    except (RuntimeError, ValueError) as e:
        return {}, f"parameter importances unavailable: {e}"


def _label(row: TrialRow) -> str:
    short = [str(v) for k, v in row.params.items() if isinstance(v, str)]
    return f"#{row.number} " + "/".join(short)


def plot_trials(rows: list[TrialRow], path: Path) -> Path:
    scored = [r for r in rows if r.score is not None]
    fig = Figure(figsize=(7, 0.9 + 0.32 * max(1, len(scored))), layout="constrained")
    ax = fig.subplots()
    ax.barh(range(len(scored)), [100 * r.score for r in scored], color="tab:blue")
    ax.set_yticks(range(len(scored)), [_label(r) for r in scored], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("val_score (gallery k-NN accuracy, %)")
    ax.set_title("trials by score")
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=110)
    return path


def plot_importances(imp: dict[str, float], path: Path) -> Path:
    fig = Figure(figsize=(6, 0.9 + 0.35 * max(1, len(imp))), layout="constrained")
    ax = fig.subplots()
    names = list(imp)
    ax.barh(range(len(names)), [imp[n] for n in names], color="tab:green")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("importance (fANOVA, normalised)")
    fig.savefig(path, dpi=110)
    return path


def plot_val_curves(rows: list[TrialRow], best: int, path: Path) -> Path:
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    for i, r in enumerate(x for x in rows if x.curve):
        ep, sc = zip(*r.curve)
        top = i < best
        ax.plot(
            ep,
            [100 * s for s in sc],
            marker="o",
            ms=3,
            lw=2 if top else 0.8,
            alpha=1 if top else 0.5,
            label=_label(r) if top else None,
        )
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("val_score (%)")
    ax.set_title("validation score per epoch (bold: best trials)")
    ax.grid(alpha=0.3)
    if best:
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return path


def gallery_curves(rows: list[TrialRow], out_dir: Path) -> None:
    """Accuracy vs gallery size of each row's best checkpoint on its validation set, written by the
    evaluation report (``results.md``, ``accuracy_vs_gallery.png``, confusions) into ``out_dir``."""
    import torch

    from xmodal.data.pipeline import load_labelled
    from xmodal.eval.embed import embed_arrays, embedding_set, model_from_state
    from xmodal.eval.protocol import run_protocol
    from xmodal.eval.report import write_report as write_eval_report
    from xmodal.train.checkpoint import load_checkpoint

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for r in rows:
        state = load_checkpoint(r.checkpoint)
        cfg = state["config"]
        val = load_labelled(
            cfg.data.val,
            cfg.data.image_size,
            cfg.data.profile_length,
            cfg.data.val_max_particles,
            cfg.data.seed,
            cfg.data.image_norm,
        )
        es = embedding_set(val, embed_arrays(model_from_state(state, device), val, device))
        results.append(
            run_protocol(
                es,
                None,
                cfg.eval.combos,
                cfg.eval.gallery_sizes,
                cfg.eval.k,
                cfg.eval.repeats,
                cfg.eval.seed,
                name=f"{r.run} (#{r.number})",
                progress=False,
            )
        )
    write_eval_report(results, out_dir)


def write_best_config(space: Space, base: dict[str, Any], best: TrialRow, path: Path) -> Path:
    cfg = space.config(base, best.params, where=f"best trial {best.number}")
    header = (
        f"# Best trial {best.number} ({best.run}) of sweep {path.parent.name}: val_score {_pct(best.score)}\n"
        f"# best checkpoint: {best.checkpoint}\n# retrain: xmodal pretrain --config {path}\n"
    )
    path.write_text(header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def _table(rows: list[TrialRow], keys: list[str], epochs: dict[int, int]) -> list[str]:
    head = ["rank", "trial", "state", "val_score", "epochs", *keys, "run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows, 1):
        state = "stopped early" if r.state == "COMPLETE" and r.epochs < epochs[r.number] else r.state.lower()
        cells = [
            str(i),
            str(r.number),
            state,
            _pct(r.score),
            f"{r.epochs}/{epochs[r.number]}",
            *(_fmt(r.params[k]) if k in r.params else "" for k in keys),
            r.run,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(
    sweep_dir: Path,
    study: Any,
    space: Space,
    base: dict[str, Any],
    curves_top: int = 3,
) -> SweepResult:
    """Write every report file of the sweep (module docstring) and return its summary."""
    rows = collect_trials(study, space, sweep_dir / RUNS)
    scored = [r for r in rows if r.score is not None]
    best = scored[0] if scored else None
    ev = base["eval"]
    lines = [
        f"# Sweep `{study.study_name}`",
        "",
        f"Objective `val_score`: gallery k-NN accuracy of {ev['val_combo']} at n={ev['val_n']} per class "
        f"(k={ev['k']}) on `{base['data']['val']}`, reported every epoch; TPE (Optuna) samples, ASHA stops "
        f"weak trials early. Space: `{space.path}`.",
        "",
        f"{len(rows)} trials: "
        + ", ".join(
            f"{sum(r.state == s for r in rows)} {s.lower()}" for s in dict.fromkeys(r.state for r in rows)
        ),
        "",
    ]
    best_config = None
    if best is not None:
        best_config = write_best_config(space, base, best, sweep_dir / BEST_CONFIG)
        lines += [
            "## Best trial",
            "",
            f"Trial {best.number} (`{best.run}`): val_score **{_pct(best.score)}** after {best.epochs} "
            f"epoch(s); best checkpoint {_pct(best.checkpoint_score)} at `{best.checkpoint}`.",
            "",
            *(f"- `{k}`: {_fmt(v)}" for k, v in best.params.items()),
            "",
            f"Retrain: `xmodal pretrain --config {best_config}`  ",
            f"Embed: `xmodal embed --checkpoint {best.checkpoint} --data PARQUET --out OUT`",
            "",
        ]
    planned = {r.number: space.config(base, r.params).optim.epochs for r in rows}
    lines += ["## Trials by score", "", *_table(rows, space.keys, planned), ""]
    if scored:
        plot_trials(rows, sweep_dir / "trials.png")
        lines += ["![trials by score](trials.png)", ""]
    imp, why = importances(study)
    lines += ["## Parameter importances", ""]
    if imp:
        plot_importances(imp, sweep_dir / "importances.png")
        lines += [
            f"From {sum(r.state == 'COMPLETE' for r in rows)} scored trials (Optuna's default evaluator; "
            "rough with few trials, and conditional parameters only count where they are set).",
            "",
            "| parameter | importance |",
            "|---|---|",
            *(f"| `{k}` | {v:.3f} |" for k, v in imp.items()),
            "",
            "![parameter importances](importances.png)",
            "",
        ]
    else:
        lines += [why, ""]
    if any(r.curve for r in rows):
        plot_val_curves(rows, min(curves_top, len(scored)), sweep_dir / "val_curves.png")
        lines += ["## Validation score per epoch", "", "![validation curves](val_curves.png)", ""]
    top = [r for r in scored if r.checkpoint is not None][:curves_top]
    if top:
        gallery_curves(top, sweep_dir / "best_trials")
        lines += [
            "## Best trials: accuracy vs gallery size",
            "",
            f"Best checkpoint of the top {len(top)} trial(s) on the validation set; tables in "
            "[best_trials/results.md](best_trials/results.md).",
            "",
            "![accuracy vs gallery size](best_trials/accuracy_vs_gallery.png)",
            "",
        ]
    lines += [
        "## Live views",
        "",
        f"- `{dashboard_command(sweep_dir)}`",
        f"- `tensorboard --logdir {sweep_dir / RUNS}`",
        "",
    ]
    report = sweep_dir / REPORT
    report.write_text("\n".join(lines))
    return SweepResult(sweep_dir, study.study_name, rows, best, best_config, report)
