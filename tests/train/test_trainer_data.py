"""The data checks of pretraining (xmodal/train/trainer.py ``check_train_data``): too few paired
particles for one batch and an unlabelled ``data.val`` are one-line DataErrors before Ray starts,
not a traceback, nor a failure after every retry of a full epoch."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import xmodal.runtime
from xmodal.config import load_config
from xmodal.data.quarantine import DataError
from xmodal.train.trainer import build_trainer, check_train_data, pretrain

REPO = Path(__file__).resolve().parents[2]


def write_set(folder: Path, image: list[bool], profile: list[bool], labels: list[str | None]) -> str:
    """Only the columns the checks read."""
    folder.mkdir(parents=True)
    table = pa.table({"has_image": image, "has_profile": profile, "label": pa.array(labels, pa.string())})
    pq.write_table(table, folder / "part-00000.parquet")
    return str(folder)


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for data that cannot train")

    monkeypatch.setattr(xmodal.runtime, "init_ray", refuse)


@pytest.fixture
def sets(tmp_path) -> dict[str, str]:
    n = 8
    return {
        # 4 pairs, 30 image-only, 6 profile-only: an export whose images and pulses do not match
        "mismatched": write_set(
            tmp_path / "mismatched",
            [True] * 34 + [False] * 6,
            [True] * 4 + [False] * 30 + [True] * 6,
            [None] * 40,
        ),
        "paired": write_set(tmp_path / "paired", [True] * n, [True] * n, [None] * n),
        "unlabelled": write_set(
            tmp_path / "unlabelled", [True] * 3, [True] * 3, [None, "unlabelled", " Unlabeled"]
        ),
        "labelled": write_set(tmp_path / "labelled", [True] * 3, [True] * 3, [None, "a", "b"]),
    }


def config(sets, train: str, val: str = "", batch: int = 8):
    return load_config(
        None, [f"data.train={sets[train]}", f"data.val={val and sets[val]}", f"optim.batch_size={batch}"]
    )


def test_fewer_pairs_than_a_batch_names_the_unpaired_particles(sets, no_ray):
    cfg = config(sets, "mismatched")
    for call in (lambda: pretrain(cfg), lambda: build_trainer(cfg, "never"), lambda: check_train_data(cfg)):
        with pytest.raises(DataError) as e:
            call()
        message = str(e.value)
        assert message.startswith(
            f"data.train={sets['mismatched']}: 4 particles with both an image and a profile"
        )
        assert "30 only an image and 6 only a profile" in message
        assert "optim.batch_size=8" in message and "\n" not in message


def test_fewer_pairs_than_a_batch_without_unpaired_particles(sets):
    with pytest.raises(
        DataError,
        match=r"8 particles with both an image and a profile, fewer than one global batch \(optim.batch_size=16\)",
    ):
        check_train_data(config(sets, "paired", batch=16))


def test_an_unlabelled_validation_set_is_refused_before_training(sets, no_ray):
    cfg = config(sets, "paired", "unlabelled")
    for call in (lambda: pretrain(cfg), lambda: build_trainer(cfg, "never")):
        with pytest.raises(DataError) as e:
            call()
        message = str(e.value)
        assert message.startswith(f"data.val={sets['unlabelled']}: this folder holds no labelled particles")
        assert "data/SEA" in message and "--set data.val=" in message


def test_a_labelled_validation_set_or_none_passes(sets):
    assert check_train_data(config(sets, "paired", "labelled")) == 8
    assert check_train_data(config(sets, "paired")) == 8


def test_a_missing_folder_names_its_key(sets, tmp_path):
    cfg = load_config(
        None, [f"data.train={sets['paired']}", f"data.val={tmp_path / 'nothing'}", "optim.batch_size=8"]
    )
    with pytest.raises(FileNotFoundError, match=r"^data.val=.*nothing: no Parquet files"):
        check_train_data(cfg)


def test_the_cli_prints_one_line(sets, no_ray, monkeypatch, capsys):
    from xmodal.cli import main

    monkeypatch.delenv("XMODAL_DEBUG", raising=False)
    args = [
        "pretrain",
        "--config",
        str(REPO / "configs" / "laptop.yaml"),
        "--set",
        f"data.train={sets['paired']}",
    ]
    assert main([*args, "--set", f"data.val={sets['unlabelled']}", "--set", "optim.batch_size=8"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(f"xmodal pretrain: error: data.val={sets['unlabelled']}: ")


def test_the_image_only_dino_baseline_counts_particles_with_an_image(sets):
    # 4 pairs and 30 image-only particles: DINO trains on all 34, the contrastive losses on the 4 pairs
    dino = ["loss.name=dino", f"data.train={sets['mismatched']}"]
    assert check_train_data(load_config(None, [*dino, "optim.batch_size=32"])) == 34
    with pytest.raises(DataError) as e:
        check_train_data(load_config(None, [*dino, "optim.batch_size=64"]))
    message = str(e.value)
    assert message.startswith(f"data.train={sets['mismatched']}: 34 particles with an image, fewer than")
    assert "loss.name=dino trains on images only" in message and "pairs" not in message


def test_the_dino_baseline_reads_every_particle_with_an_image(sets, tmp_path, monkeypatch):
    import xmodal.data.pipeline as pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "train_dataset", lambda *a, **k: seen.update(k))
    cfg = load_config(
        None,
        [
            f"data.train={sets['mismatched']}",
            "loss.name=dino",
            "optim.batch_size=32",
            "model.center_particles=0",
            f"train.storage_path={tmp_path / 'runs'}",
        ],
    )
    trainer, _ = build_trainer(cfg, "dino")
    assert seen["paired"] is False
    assert trainer.train_loop_config["n_train"] == 34  # the steps an epoch are counted from these
