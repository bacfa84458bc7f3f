"""The training dataset (``xmodal.data.pipeline.train_dataset``) on a real local Ray cluster: every
paired particle once per epoch, in a new order each epoch when ``data.shuffle`` is on, in file
order when it is off."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from xmodal.config import load_config
from xmodal.data.pipeline import local_shuffle, train_dataset


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    from xmodal.data.synth import synthesize

    out = tmp_path_factory.mktemp("pool")
    synthesize(out, n_lab=0, n_sea=0, n_uto=200, seed=2, fmt="parquet", image_size=24)
    return out / "UTO"


def _epoch(ds, **iter_args) -> list[tuple[float, ...]]:
    """Each row as its (height, width, length) metadata, in the order the epoch yields them."""
    rows = []
    for b in ds.iter_batches(batch_size=32, batch_format="numpy", **iter_args):
        rows += [tuple(r) for r in np.concatenate([b["image_meta"], b["profile_meta"]], axis=1).round(6)]
    return rows


def test_rows_are_shuffled_anew_every_epoch(ray_session, pool: Path) -> None:
    on = load_config(None, [f"data.train={pool}", "data.image_size=24"]).data
    off = load_config(None, [f"data.train={pool}", "data.image_size=24", "data.shuffle=none"]).data
    in_order = train_dataset(off, augment=False, batch_size=32)
    first, second = _epoch(in_order), _epoch(in_order)
    assert first == second and len(first) == 200  # file order, every epoch
    shuffled = train_dataset(on, augment=False, batch_size=32)
    a, b = _epoch(shuffled), _epoch(shuffled)
    assert sorted(a) == sorted(b) == sorted(first)  # every particle once per epoch
    assert a != first and b != first and a != b  # a new order each epoch


def test_local_shuffle_mixes_rows_as_batches_are_drawn(ray_session, pool: Path) -> None:
    cfg = load_config(None, [f"data.train={pool}", "data.image_size=24", "data.shuffle=local"]).data
    assert local_shuffle(cfg, 32, 5) == {"local_shuffle_buffer_size": 8 * 32, "local_shuffle_seed": 5}
    ds = train_dataset(cfg, augment=False, batch_size=32)
    in_order = _epoch(train_dataset(replace(cfg, shuffle="none"), augment=False, batch_size=32))
    a, b = _epoch(ds, **local_shuffle(cfg, 32, 1)), _epoch(ds, **local_shuffle(cfg, 32, 2))
    assert sorted(a) == sorted(b) == sorted(in_order) and a != in_order and a != b
    assert local_shuffle(replace(cfg, shuffle="global"), 32, 1) == {}  # no buffer: rows come shuffled


def test_an_image_only_loss_keeps_the_particles_without_a_profile(ray_session, pool: Path, tmp_path) -> None:
    """The DINO baseline (``paired=False``) trains on every particle with an image; the contrastive
    losses on the pairs only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from xmodal.data.schema import read_table

    table = read_table(pool)
    has_profile = np.arange(table.num_rows) % 4 == 0  # an image-only instrument's share
    i = table.schema.get_field_index("has_profile")
    (tmp_path / "mixed").mkdir()
    pq.write_table(
        table.set_column(i, "has_profile", pa.array(has_profile)), tmp_path / "mixed" / "p.parquet"
    )
    cfg = load_config(
        None, [f"data.train={tmp_path / 'mixed'}", "data.image_size=24", "data.shuffle=none"]
    ).data
    assert len(_epoch(train_dataset(cfg, augment=False, batch_size=32, paired=False))) == 200
    assert len(_epoch(train_dataset(cfg, augment=False, batch_size=32))) == 50
