"""Classification outputs, appended as query shards stream past:

    predictions.parquet   one row per particle; neighbours as lists
    predictions.csv       the same, neighbour lists joined with ";"
    ecotaxa.tsv           EcoTaxa's import format: a header row, then a type row ([t] text, [f] number)
    counts.csv            per predicted class: count, fraction (and per mL when a volume is given)

In the EcoTaxa file an accepted prediction is ``object_annotation_category`` with status
``predicted``; a rejected one (``unknown``) leaves both empty, so EcoTaxa shows it as unclassified
for a person to sort, and keeps the best guess in ``object_xmodal_best_guess``.

A particle without the embedding the search needs (no image under ``--query-kind image``; see
``NOT_CLASSIFIED``) was never compared with the gallery. Its prediction says so (``no_image``...)
in predictions.parquet/.csv, but it is neither a class nor ``unknown``: it is left out of
counts.csv (so fractions and per-mL figures are of the classified particles only) and out of
ecotaxa.tsv, where an empty category would read as "rejected, sort by hand" (an EcoTaxa import
leaves objects it does not list as they were). summary.json counts them under ``not_classified``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from xmodal.config import ConfigError

UNKNOWN = "unknown"
# query kind -> the prediction of a particle without any embedding of that kind (never searched)
NOT_CLASSIFIED = {"image": "no_image", "profile": "no_profile", "fused": "no_image_or_profile"}
RESERVED = (UNKNOWN, *NOT_CLASSIFIED.values())  # prediction values that are not gallery classes

PREDICTION_SCHEMA = pa.schema(
    [
        ("particle_id", pa.string()),
        ("domain", pa.string()),
        ("label", pa.string()),  # the particle's own label when it has one (for evaluation)
        ("prediction", pa.string()),  # class, "unknown" below the threshold, or a NOT_CLASSIFIED value
        ("best_class", pa.string()),  # the vote's winner before rejection
        ("confidence", pa.float32()),
        ("similarity", pa.float32()),
        ("score", pa.float32()),
        ("neighbour_ids", pa.list_(pa.string())),
        ("neighbour_labels", pa.list_(pa.string())),
        ("neighbour_scores", pa.list_(pa.float32())),
    ]
)
LIST_COLUMNS = ("neighbour_ids", "neighbour_labels", "neighbour_scores")

ECOTAXA_COLUMNS = {  # column -> EcoTaxa type
    "object_id": "[t]",
    "object_annotation_category": "[t]",
    "object_annotation_status": "[t]",
    "object_xmodal_best_guess": "[t]",
    "object_xmodal_score": "[f]",
    "object_xmodal_confidence": "[f]",
    "object_xmodal_similarity": "[f]",
}


def _text(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    return pc.fill_null(column, "")


def classified(pred: pa.Table) -> pa.Array:
    """Rows that were searched (a class or ``unknown``), as a boolean mask."""
    return pc.invert(pc.is_in(pred.column("prediction"), value_set=pa.array(list(NOT_CLASSIFIED.values()))))


def check_volume(volume_ml: float | None) -> None:
    if volume_ml is not None and not volume_ml > 0:  # `not >` also refuses NaN
        raise ConfigError(f"--volume-ml {volume_ml}: the sample volume must be a positive number of mL")


def ecotaxa_table(pred: pa.Table) -> pa.Table:
    pred = pred.filter(classified(pred))  # not classified: not a rejection, so not listed (see above)
    accepted = pc.not_equal(pred.column("prediction"), UNKNOWN)
    return pa.table(
        {
            "object_id": pred.column("particle_id"),
            "object_annotation_category": pc.if_else(accepted, pred.column("prediction"), ""),
            "object_annotation_status": pc.if_else(accepted, "predicted", ""),
            "object_xmodal_best_guess": _text(pred.column("best_class")),
            "object_xmodal_score": pc.round(pred.column("score"), 4),
            "object_xmodal_confidence": pc.round(pred.column("confidence"), 4),
            "object_xmodal_similarity": pc.round(pred.column("similarity"), 4),
        }
    )


def csv_table(pred: pa.Table) -> pa.Table:
    """Predictions with each neighbour list joined by ";" (CSV has no lists)."""
    for name in LIST_COLUMNS:
        col = pred.column(name)
        text = pc.binary_join(pc.cast(col, pa.list_(pa.string())), ";")
        pred = pred.set_column(pred.schema.get_field_index(name), name, text)
    return pred


def counts_frame(counts: Counter, volume_ml: float | None = None) -> pd.DataFrame:
    """Per predicted class (``unknown`` included), most frequent first."""
    check_volume(volume_ml)
    total = sum(counts.values())
    rows = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    df = pd.DataFrame({"class": [c for c, _ in rows], "count": [n for _, n in rows]})
    df["fraction"] = (df["count"] / max(total, 1)).round(6)
    if volume_ml is not None:
        df["per_ml"] = (df["count"] / volume_ml).round(6)
    return df


class PredictionWriter:
    """Appends each shard's predictions (a ``PREDICTION_SCHEMA`` table) to all outputs and counts
    the predicted classes (``counts``) and the particles not classified (``not_classified``).
    Everything is columnar (Arrow), so a million particles take seconds."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.counts: Counter = Counter()
        self.not_classified: Counter = Counter()
        self.rows = 0
        self._parquet = pq.ParquetWriter(
            self.out / "predictions.parquet", PREDICTION_SCHEMA, compression="zstd"
        )
        self._csv = pa_csv.CSVWriter(
            self.out / "predictions.csv", csv_table(PREDICTION_SCHEMA.empty_table()).schema
        )
        self._tsv_file = open(self.out / "ecotaxa.tsv", "wb")
        self._tsv_file.write(
            ("\t".join(ECOTAXA_COLUMNS) + "\n" + "\t".join(ECOTAXA_COLUMNS.values()) + "\n").encode()
        )
        self._tsv = pa_csv.CSVWriter(
            self._tsv_file,
            ecotaxa_table(PREDICTION_SCHEMA.empty_table()).schema,
            write_options=pa_csv.WriteOptions(include_header=False, delimiter="\t"),
        )

    def write(self, pred: pa.Table) -> None:
        self._parquet.write_table(pred)
        self._csv.write_table(csv_table(pred))
        self._tsv.write_table(ecotaxa_table(pred))
        for item in pc.value_counts(pred.column("prediction")).to_pylist():
            kept = self.not_classified if item["values"] in NOT_CLASSIFIED.values() else self.counts
            kept[item["values"]] += item["counts"]
        self.rows += pred.num_rows

    def close(self, volume_ml: float | None = None) -> pd.DataFrame:
        self._parquet.close()
        self._csv.close()
        self._tsv.close()
        self._tsv_file.close()
        counts = counts_frame(self.counts, volume_ml)
        counts.to_csv(self.out / "counts.csv", index=False)
        return counts
