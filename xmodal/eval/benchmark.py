"""``xmodal benchmark``: load embeddings of one or several models, run the gallery protocol on
each, write the report and print the paper-style table.

Modes follow from the arguments: ``query_embeddings`` given -> split (gallery from ``embeddings``,
queries from ``query_embeddings``); else ``query_domain`` given -> split inside each embedding set by
domain (cross-domain, e.g. gallery_domain="LAB", query_domain="SEA"); else single mode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from xmodal.config import ConfigError
from xmodal.data.quarantine import DataError
from xmodal.eval.embeddings import EmbeddingSet, check_same_checkpoint, embeddings_checkpoint, load_embeddings
from xmodal.eval.protocol import COMBOS, ProtocolResult, run_protocol
from xmodal.eval.report import markdown, write_report

PathLike = str | Path
Inputs = PathLike | Sequence[PathLike] | Mapping[str, PathLike]


def named_paths(inputs: Inputs) -> dict[str, Path]:
    """Model name -> embeddings path. Accepts a mapping, one path, or a list of paths / "NAME=PATH"
    strings; an unnamed path is named after its folder (or file stem), made unique with its parent."""
    if isinstance(inputs, Mapping):
        return {str(k): Path(v) for k, v in inputs.items()}
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    pairs: list[tuple[str | None, Path]] = []
    for item in items:
        text = str(item)
        if isinstance(item, str) and "=" in text and not Path(text).exists():
            name, path = text.split("=", 1)
            pairs.append((name.strip(), Path(path)))
        else:
            pairs.append((None, Path(item)))
    out: dict[str, Path] = {}
    for name, path in pairs:
        label = name or (path.stem if path.is_file() else path.name) or str(path)
        if label in out:
            label = f"{path.parent.name}/{label}" if not name else label
        if label in out:
            raise ConfigError(
                f"benchmark: two embedding inputs are both named {label!r}; name them NAME=PATH"
            )
        out[label] = path
    return out


def _domain(es: EmbeddingSet, domain: str | None, where: Path, role: str) -> EmbeddingSet:
    if domain is None:
        return es
    mask = es.domain.astype(str) == domain
    if not mask.any():
        found = sorted({str(d) for d in es.domain})
        raise ConfigError(f"{where}: no particles of {role} domain {domain!r}; domains present: {found}")
    return es.subset(mask)


def _check_labelled(es: EmbeddingSet, where: Path, role: str) -> None:
    """The protocol scores predictions against labels: each side needs some."""
    if not es.labelled.any():
        raise DataError(
            f"{where}: none of the {len(es)} {role} particles is labelled (the `label` column); the "
            "benchmark needs labelled particles: embed a labelled dataset, e.g. the LAB folder"
        )


def benchmark(
    embeddings: Inputs,
    out_dir: PathLike,
    combos: Sequence[str] | None = None,
    gallery_sizes: Sequence[int] = (1, 2, 4, 8, 16),
    k: int | Sequence[int] = 3,
    repeats: int = 5,
    seed: int = 0,
    query_embeddings: Inputs | None = None,
    gallery_domain: str | None = None,
    query_domain: str | None = None,
    folds: int | None = None,
    progress: bool = True,
) -> list[ProtocolResult]:
    """Run the protocol for every model in ``embeddings`` and write ``out_dir/results.{json,md}`` and
    the plots. ``query_embeddings``, when given, must name one query set per model (same names or
    same order), since each model embeds its own queries."""
    models = named_paths(embeddings)
    queries: dict[str, Path] = {}
    if query_embeddings is not None:
        given = named_paths(query_embeddings)
        if len(given) != len(models):
            raise ConfigError(
                f"benchmark: {len(models)} embedding sets but {len(given)} query sets; give one query set per "
                "model (each model embeds its own queries)"
            )
        same_names = set(given) == set(models)
        queries = {m: given[m] for m in models} if same_names else dict(zip(models, given.values()))
    results = []
    for name, path in models.items():
        es = load_embeddings(path)
        if name in queries:
            # a model's gallery and queries must share its space (different models, side by side, need not)
            check_same_checkpoint(
                path, embeddings_checkpoint(path), queries[name], embeddings_checkpoint(queries[name])
            )
            gallery = _domain(es, gallery_domain, path, "gallery")
            qset = _domain(load_embeddings(queries[name]), query_domain, queries[name], "query")
        elif query_domain is not None:
            qset = _domain(es, query_domain, path, "query")
            rest = es.subset(es.domain.astype(str) != query_domain)
            gallery = _domain(rest, gallery_domain, path, "gallery") if gallery_domain else rest
        else:
            gallery, qset = _domain(es, gallery_domain, path, "gallery"), None
        _check_labelled(gallery, path, "gallery")
        if qset is not None:
            _check_labelled(qset, queries.get(name, path), "query")
        title = name + (f" ({gallery_domain or 'rest'}→{query_domain})" if query_domain else "")
        print(
            f"[xmodal] benchmark {title}: {len(gallery)} gallery-side particles"
            + (f", {len(qset)} query particles" if qset is not None else " (single mode)")
        )
        results.append(
            run_protocol(
                gallery,
                qset,
                list(combos or COMBOS),
                gallery_sizes,
                k,
                repeats,
                seed,
                folds,
                title,
                progress=progress,
            )
        )
    paths = write_report(results, out_dir)
    print(markdown(results))
    n_cells = sum(bool(c.accuracy) for r in results for c in r.cells.values())
    print(
        f"[xmodal] benchmark: {len(results)} model(s), {n_cells} cells -> {paths['md']}, {paths['plot'].name}"
    )
    return results
