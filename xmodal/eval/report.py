"""Reports of gallery k-NN results for people: ``results.json`` (every number), ``results.md`` (the
paper-style table: rows = gallery-query combinations, columns = n, cells = accuracy mean ± std in %),
``accuracy_vs_gallery.png`` and ``confusion_<combo>.png``.

Figures use matplotlib's object API (``Figure``), never pyplot, so no GUI backend or global state is
touched: reports can be written from worker processes and tests alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from xmodal.eval.protocol import Cell, ProtocolResult

_MAX_TICK_CLASSES = 40  # beyond this, class names on the confusion axes are unreadable


def _as_list(results: ProtocolResult | Sequence[ProtocolResult]) -> list[ProtocolResult]:
    out = [results] if isinstance(results, ProtocolResult) else list(results)
    if not out:
        raise ValueError("report: no results to write")
    return out


def _pct(cell: Cell, metric: str = "accuracy") -> str:
    mean, std = cell.mean(metric), cell.std(metric)
    return "–" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * std:.1f}"


def _setting(r: ProtocolResult) -> str:
    runs = f"{r.repeats} repeats" + (f" × {r.folds} folds" if r.folds else "")
    c = r.counts
    data = f"{c['gallery_labelled']} labelled particles"
    classes = f"{len(r.classes)} classes"
    if r.mode == "split":
        data = f"gallery from {c['gallery_labelled']}, queries {c['query_labelled']} labelled particles"
        classes += f" ({c['gallery_classes']} in the gallery set, {c['query_classes']} among the queries)"
        lost = c["queries_class_not_in_gallery"]
        if lost:  # said here, next to the class count, because it caps every score below
            ceiling = 100 * (1 - lost / c["query_labelled"])
            classes += (
                f"; {lost} of {c['query_labelled']} queries are of classes absent from the gallery set "
                f"and always count as errors: accuracy ≤ {ceiling:.1f} % (details below)"
            )
    return f"{r.mode} mode, {runs}, seed {r.seed}; {data}, {classes}"


def _num(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def _span(values: list[int]) -> str:
    return (
        "–" if not values else _num(min(values)) + ("" if min(values) == max(values) else f"–{max(values)}")
    )


def _query_class_note(r: ProtocolResult) -> str:
    """Classes that have queries, per n (over combinations and runs): in single mode a class with at
    most n particles gives them all to the gallery, so the columns of one row differ in classes."""
    k = r.ks[0]
    per_n = [
        _span([v for combo in r.combos for v in r.cell(combo, n, k).query_classes]) for n in r.gallery_sizes
    ]
    line = f"- classes with queries (of {len(r.classes)}): " + ", ".join(
        f"n={n}: {v}" for n, v in zip(r.gallery_sizes, per_n)
    )
    if len(set(per_n)) > 1:
        line += (
            "; they differ between n: a class with at most n labelled particles gives all of them to the "
            "gallery and has no query, so larger n are scored on fewer classes"
        )
    return line


def _unreachable_notes(r: ProtocolResult) -> list[str]:
    """Per group of combinations alike: the queries whose class has no particle in the gallery. The
    protocol keeps them as errors (as the paper does); the reader needs the ceiling they imply."""
    k, last = r.ks[0], r.gallery_sizes[-1]
    groups: dict[str, list[str]] = {}
    for combo in r.combos:
        cell = r.cell(combo, last, k)
        if not sum(cell.unreachable_queries):
            continue
        runs = len(cell.unreachable_queries)
        classes = ", ".join(
            f"{name} {_num(u / runs)}" for name, u in zip(r.classes, cell.unreachable_by_class) if u
        )
        # split mode: the queries, hence the ceiling, are the same at every n; single mode: fewer
        # queries at larger n, so the ceiling moves
        by_n = [r.cell(combo, n, k) for n in r.gallery_sizes]
        ceilings = {f"{100 * np.mean(c.ceiling()):.1f}" for c in by_n if c.n_queries}
        where = "at every n" if len(ceilings) == 1 else f"at n = {last}"
        text = (
            f"{_num(np.mean(cell.unreachable_queries))} of {_num(np.mean(cell.n_queries))} queries per run are "
            f"of classes with no gallery particle ({classes}); they count as errors (the paper's protocol), "
            f"so accuracy is at most {100 * np.mean(cell.ceiling()):.1f} % {where}"
        )
        groups.setdefault(text, []).append(combo)
    return [
        f"- {'every combination' if len(combos) == len(r.combos) else ', '.join(combos)}: {text}"
        for text, combos in groups.items()
    ]


def _notes(r: ProtocolResult) -> list[str]:
    """Cells that skipped runs or excluded particles lacking a modality, so counts reconcile."""
    lines = []
    for combo in r.combos:
        cell = r.cell(combo, r.gallery_sizes[-1])
        if cell.skipped:
            why = ", ".join(f"{reason} ({runs} runs)" for reason, runs in cell.skipped.items())
            lines.append(f"- {combo}: not evaluated: {why}")
        elif max(cell.excluded_gallery, default=0) or max(cell.excluded_queries, default=0):
            lines.append(
                f"- {combo}: excluded for a missing modality: {max(cell.excluded_gallery)} gallery-pool and "
                f"{max(cell.excluded_queries)} query particles"
            )
    return lines


def markdown(results: ProtocolResult | Sequence[ProtocolResult]) -> str:
    """The paper-style table(s): accuracy (%) mean ± std per combination and n, a model column when
    several results are compared, then macro precision / recall / F1 at the largest n per model."""
    rs = _as_list(results)
    several = len(rs) > 1
    lines = ["# Gallery k-NN benchmark", ""]
    for r in rs:
        lines.append(f"- **{r.name or 'embeddings'}**: {_setting(r)}")
    ks = rs[0].ks
    sizes = sorted({n for r in rs for n in r.gallery_sizes})
    for k in ks:
        lines += [
            "",
            f"## Accuracy (%), k = {k}: rows = gallery–query, columns = labelled particles per class",
            "",
        ]
        head = (["model"] if several else []) + ["gallery-query"] + [f"n={n}" for n in sizes]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rs:
            for combo in r.combos:
                row = [r.name] if several else []
                row.append(combo)
                for n in sizes:
                    row.append(_pct(r.cell(combo, n, k)) if (combo, n, k) in r.cells else "–")
                lines.append("| " + " | ".join(row) + " |")
    for r in rs:
        n, k = r.gallery_sizes[-1], r.ks[0]
        title = f"{r.name} — " if r.name else ""
        lines += ["", f"## {title}macro metrics (%) at n = {n}, k = {k}", ""]
        lines += [
            "| gallery-query | accuracy | precision | recall | F1 | queries / run |",
            "|---|---|---|---|---|---|",
        ]
        for combo in r.combos:
            cell = r.cell(combo, n, k)
            if not cell.accuracy:
                continue  # listed in the notes below
            queries = f"{np.mean(cell.n_queries):.0f}"
            row = [combo] + [_pct(cell, m) for m in ("accuracy", "precision", "recall", "f1")]
            lines.append("| " + " | ".join(row + [queries]) + " |")
        lines += ["", _query_class_note(r), *_unreachable_notes(r), *_notes(r)]
    return "\n".join(lines) + "\n"


def plot_accuracy(results: ProtocolResult | Sequence[ProtocolResult], path: str | Path) -> Path:
    """Accuracy vs gallery size: one line per combination with ± std error bars, a panel per model."""
    rs = _as_list(results)
    fig = Figure(figsize=(5.5 * len(rs), 4.2), layout="constrained")
    axes = fig.subplots(1, len(rs), squeeze=False, sharey=True)[0]
    for ax, r in zip(axes, rs):
        k = r.ks[0]
        for combo in r.combos:
            cells = [r.cell(combo, n, k) for n in r.gallery_sizes]
            mean = np.array([100 * c.mean() for c in cells])
            if np.isnan(mean).all():
                continue
            std = np.array([100 * c.std() for c in cells])
            style = "-" if combo.endswith("I+P") else "--" if combo.endswith("-P") else ":"
            ax.errorbar(r.gallery_sizes, mean, yerr=std, label=combo, marker="o", ms=3, capsize=3, ls=style)
        ax.set_xscale("log", base=2)
        ax.set_xticks(r.gallery_sizes, [str(n) for n in r.gallery_sizes])
        ax.set_xlabel("labelled particles per class (n)")
        ax.set_title(f"{r.name or 'embeddings'} ({r.mode}, k={k})")
        ax.grid(alpha=0.3)
        ax.legend(title="gallery – query", fontsize=7)
    axes[0].set_ylabel("accuracy (%)")
    out = Path(path)
    fig.savefig(out, dpi=120)
    return out


def plot_confusion(results: ProtocolResult | Sequence[ProtocolResult], combo: str, path: str | Path) -> Path:
    """Row-normalised confusion matrix (recall on the diagonal), pooled over runs, at the largest n
    and first k; a panel per model."""
    rs = _as_list(results)
    fig = Figure(figsize=(6 * len(rs), 5.2))  # a layout engine with colorbars doubles the time; "tight" trims
    axes = fig.subplots(1, len(rs), squeeze=False, gridspec_kw={"wspace": 0.45})[0]
    for ax, r in zip(axes, rs):
        n = r.gallery_sizes[-1]
        cell = r.cell(combo, n)
        support = cell.confusion.sum(axis=1, keepdims=True)
        norm = np.divide(cell.confusion, support, out=np.zeros(cell.confusion.shape), where=support > 0)
        im = ax.imshow(norm, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"{r.name or 'embeddings'}: {combo}, n={n} ({_pct(cell)} %)", fontsize=9)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if len(r.classes) <= _MAX_TICK_CLASSES:
            ticks = np.arange(len(r.classes))
            ax.set_xticks(ticks, r.classes, rotation=90, fontsize=6)
            ax.set_yticks(ticks, r.classes, fontsize=6)
        fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true class")
    out = Path(path)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return out


def _json_safe(x: object) -> object:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def write_report(results: ProtocolResult | Sequence[ProtocolResult], out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, results.md, accuracy_vs_gallery.png and one confusion_<combo>.png per
    combination evaluated in any result. Returns the paths by name."""
    rs = _as_list(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md"}
    payload = {"results": [_json_safe(r.to_dict()) for r in rs]}
    paths["json"].write_text(json.dumps(payload, indent=1, allow_nan=False))
    paths["md"].write_text(markdown(rs))
    paths["plot"] = plot_accuracy(rs, out / "accuracy_vs_gallery.png")
    for combo in dict.fromkeys(c for r in rs for c in r.combos):
        having = [r for r in rs if combo in r.combos and r.cell(combo, r.gallery_sizes[-1]).accuracy]
        if having:
            paths[f"confusion_{combo}"] = plot_confusion(having, combo, out / f"confusion_{combo}.png")
    return paths
