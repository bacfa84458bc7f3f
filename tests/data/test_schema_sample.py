"""``sample_table``: a bounded, seeded random sample of a Parquet dataset, read by whole row groups;
``load_sample``: that sample as a model batch (the embedding center's input)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xmodal.data.pipeline import load_sample
from xmodal.data.schema import sample_table


@pytest.fixture
def grouped(tmp_path):
    """Two files of 5 and 3 row groups of 10 rows: row ``i`` holds ``i`` (group = i // 10)."""
    start = 0
    for name, groups in (("a.parquet", 5), ("b.parquet", 3)):
        n = groups * 10
        pq.write_table(pa.table({"i": np.arange(start, start + n)}), tmp_path / name, row_group_size=10)
        start += n
    return tmp_path


def test_sample_is_bounded_seeded_and_taken_from_few_row_groups(grouped) -> None:
    t = sample_table(grouped, ["i"], max_rows=12, seed=3, max_groups=3)
    rows = t.column("i").to_numpy()
    assert len(rows) == 12 and len(set(rows)) == 12 and rows.min() >= 0 and rows.max() < 80
    assert len(set(rows // 10)) <= 3  # only whole row groups are read, at most max_groups of them
    np.testing.assert_array_equal(sample_table(grouped, ["i"], 12, seed=3, max_groups=3).column("i"), rows)
    assert not np.array_equal(sample_table(grouped, ["i"], 12, seed=4, max_groups=3).column("i"), rows)

    everything = sample_table(grouped, ["i"], max_rows=1000, seed=0, max_groups=100)
    np.testing.assert_array_equal(np.sort(everything.column("i")), np.arange(80))
    # over seeds the picked groups cover the dataset, both files included
    seen = {
        g
        for s in range(20)
        for g in sample_table(grouped, ["i"], 5, seed=s, max_groups=2).column("i").to_numpy() // 10
    }
    assert seen == set(range(8))
    with pytest.raises(ValueError, match="max_rows"):
        sample_table(grouped, ["i"], 0)


def test_load_sample_gives_a_model_batch_of_an_unlabelled_pool(tmp_path) -> None:
    from xmodal.data.synth import synthesize

    synthesize(tmp_path, n_lab=0, n_sea=0, n_uto=40, seed=0, fmt="parquet", image_size=24)
    batch = load_sample(str(tmp_path / "UTO"), 24, 16, max_particles=25, seed=1)
    assert batch["image"].shape == (25, 1, 24, 24) and batch["profile"].shape == (25, 6, 16)
    assert batch["has_image"].dtype == bool and batch["has_profile"].dtype == bool
