"""The training dataset (``xmodal.data.pipeline.train_dataset``) on a real local Ray cluster: every
paired particle once per epoch, in a new order each epoch when ``data.shuffle`` is on, in file
order when it is off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xmodal.config import load_config
from xmodal.data.pipeline import train_dataset


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    from xmodal.data.synth import synthesize

    out = tmp_path_factory.mktemp("pool")
    synthesize(out, n_lab=0, n_sea=0, n_uto=200, seed=2, fmt="parquet", image_size=24)
    return out / "UTO"


def _epoch(ds) -> list[tuple[float, ...]]:
    """Each row as its (height, width, length) metadata, in the order the epoch yields them."""
    rows = []
    for b in ds.iter_batches(batch_size=32, batch_format="numpy"):
        rows += [tuple(r) for r in np.concatenate([b["image_meta"], b["profile_meta"]], axis=1).round(6)]
    return rows


def test_rows_are_shuffled_anew_every_epoch(ray_session, pool: Path) -> None:
    on = load_config(None, [f"data.train={pool}", "data.image_size=24"]).data
    off = load_config(None, [f"data.train={pool}", "data.image_size=24", "data.shuffle=false"]).data
    in_order = train_dataset(off, augment=False, batch_size=32)
    first, second = _epoch(in_order), _epoch(in_order)
    assert first == second and len(first) == 200  # file order, every epoch
    shuffled = train_dataset(on, augment=False, batch_size=32)
    a, b = _epoch(shuffled), _epoch(shuffled)
    assert sorted(a) == sorted(b) == sorted(first)  # every particle once per epoch
    assert a != first and b != first and a != b  # a new order each epoch
