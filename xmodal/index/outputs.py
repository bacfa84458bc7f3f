"""Classification outputs, appended as query shards stream past:

    predictions.parquet   one row per particle; neighbours as lists
    predictions.csv       the same, neighbour lists joined with ";"
    ecotaxa.tsv           EcoTaxa's import format: a header row, then a type row ([t] text, [f] number)
    counts.csv            per predicted class: count, fraction (and per mL when a volume is given)

In the EcoTaxa file an accepted prediction is ``object_annotation_category`` with status
``predicted``; a rejected one (``unknown``) leaves both empty, so EcoTaxa shows it as unclassified
for a person to sort, and keeps the best guess in ``object_xmodal_best_guess``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

UNKNOWN = "unknown"

PREDICTION_SCHEMA = pa.schema(
    [
        ("particle_id", pa.string()),
        ("domain", pa.string()),
        ("label", pa.string()),  # the particle's own label when it has one (for evaluation)
        ("prediction", pa.string()),  # class, or "unknown" below the threshold
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


def ecotaxa_frame(pred: pd.DataFrame) -> pd.DataFrame:
    accepted = pred["prediction"] != UNKNOWN
    return pd.DataFrame(
        {
            "object_id": pred["particle_id"],
            "object_annotation_category": pred["prediction"].where(accepted, ""),
            "object_annotation_status": np.where(accepted, "predicted", ""),
            "object_xmodal_best_guess": pred["best_class"].fillna(""),
            "object_xmodal_score": pred["score"].round(4),
            "object_xmodal_confidence": pred["confidence"].round(4),
            "object_xmodal_similarity": pred["similarity"].round(4),
        }
    )


def csv_frame(pred: pd.DataFrame) -> pd.DataFrame:
    out = pred.copy()
    for c in LIST_COLUMNS:
        out[c] = [";".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in xs) for xs in pred[c]]
    return out


def counts_frame(counts: Counter, volume_ml: float | None = None) -> pd.DataFrame:
    """Per predicted class (``unknown`` included), most frequent first."""
    total = sum(counts.values())
    rows = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    df = pd.DataFrame({"class": [c for c, _ in rows], "count": [n for _, n in rows]})
    df["fraction"] = (df["count"] / max(total, 1)).round(6)
    if volume_ml:
        df["per_ml"] = (df["count"] / volume_ml).round(6)
    return df


class PredictionWriter:
    """Appends each shard's predictions to all outputs and counts predicted classes."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.counts: Counter = Counter()
        self.rows = 0
        self._parquet = pq.ParquetWriter(
            self.out / "predictions.parquet", PREDICTION_SCHEMA, compression="zstd"
        )
        self._csv_path = self.out / "predictions.csv"
        self._tsv = open(self.out / "ecotaxa.tsv", "w", newline="")
        self._tsv.write("\t".join(ECOTAXA_COLUMNS) + "\n" + "\t".join(ECOTAXA_COLUMNS.values()) + "\n")

    def write(self, pred: pd.DataFrame) -> None:
        self._parquet.write_table(pa.Table.from_pandas(pred, schema=PREDICTION_SCHEMA, preserve_index=False))
        csv_frame(pred).to_csv(
            self._csv_path, mode="w" if self.rows == 0 else "a", header=self.rows == 0, index=False
        )
        ecotaxa_frame(pred).to_csv(self._tsv, sep="\t", header=False, index=False, lineterminator="\n")
        self.counts.update(pred["prediction"].tolist())
        self.rows += len(pred)

    def close(self, volume_ml: float | None = None) -> pd.DataFrame:
        self._parquet.close()
        self._tsv.close()
        if self.rows == 0:
            pd.DataFrame(columns=PREDICTION_SCHEMA.names).to_csv(self._csv_path, index=False)
        counts = counts_frame(self.counts, volume_ml)
        counts.to_csv(self.out / "counts.csv", index=False)
        return counts
