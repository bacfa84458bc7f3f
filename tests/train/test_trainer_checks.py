"""The driver's checks in xmodal/train/trainer.py that need no Ray Train run: workers that do not fit
the Ray cluster (``check_resources``, on a mocked ``ray.cluster_resources``), a re-used run name with
another model (``check_resumable``), and the best checkpoint of a run without ``data.val``."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

import xmodal.runtime
import xmodal.train.trainer as trainer
from xmodal.config import ConfigError, load_config
from xmodal.train.checkpoint import save_checkpoint
from xmodal.train.trainer import check_resources, check_resumable, pretrain

REPO = Path(__file__).resolve().parents[2]
LAPTOP = REPO / "configs" / "laptop.yaml"
PAPER_GPU = REPO / "configs" / "paper_convnext_femto_cnn_clip.yaml"


def cluster(monkeypatch, cpus: float, gpus: float = 0) -> None:
    have = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    monkeypatch.setattr(ray, "cluster_resources", lambda: have)


def test_the_defaults_and_the_laptop_config_fit_a_two_cpu_machine(monkeypatch):
    cluster(monkeypatch, 2)
    check_resources(load_config(None), joined=False)
    check_resources(load_config(LAPTOP), joined=False)


def test_workers_that_leave_no_cpu_for_data_loading_are_refused_with_settings_that_fit(monkeypatch):
    # the built-in defaults before 0.5: 2 workers x 1 CPU took both CPUs and Ray Data never ran
    cluster(monkeypatch, 2)
    with pytest.raises(ConfigError) as e:
        check_resources(load_config(None, ["train.cpus_per_worker=1"]), joined=False)
    message = str(e.value)
    assert message.startswith("train.num_workers x train.cpus_per_worker = 2 x 1 = 2 CPUs for training")
    assert "this Ray cluster has 2" in message and message.endswith("set --set train.cpus_per_worker=0.5")
    assert "\n" not in message


def test_too_many_workers_are_cut_to_a_count_that_divides_the_batch(monkeypatch):
    cluster(monkeypatch, 3)  # 2 CPUs spare: at most 4 workers of half a CPU, and 4 divides 64
    cfg = load_config(None, ["train.num_workers=8", "optim.batch_size=64"])
    with pytest.raises(ConfigError, match=r"set --set train.num_workers=4 --set train.cpus_per_worker=0.5$"):
        check_resources(cfg, joined=False)


def test_a_gpu_config_on_a_cpu_cluster_is_refused_with_cpu_settings(monkeypatch):
    cluster(monkeypatch, 2)
    cfg = load_config(PAPER_GPU, ["optim.batch_size=64"])
    assert cfg.train.use_gpu and cfg.train.num_workers == 4
    with pytest.raises(ConfigError) as e:
        check_resources(cfg, joined=False)
    message = str(e.value)
    assert (
        message.startswith("train.use_gpu=true with train.num_workers=4 asks for 4 GPUs")
        and "has 0" in message
    )
    assert message.endswith(
        "--set train.use_gpu=false --set train.num_workers=2 --set train.cpus_per_worker=0.5"
    )


def test_enough_gpus_pass(monkeypatch):
    cluster(monkeypatch, 64, gpus=4)
    check_resources(load_config(PAPER_GPU), joined=False)


def test_a_joined_cluster_only_warns_as_it_may_grow(monkeypatch, capsys):
    cluster(monkeypatch, 2)
    check_resources(load_config(None, ["train.cpus_per_worker=1"]), joined=True)
    err = capsys.readouterr().err
    assert err.startswith("[xmodal] warning: train.num_workers x train.cpus_per_worker") and "grows" in err


def write_pool(folder: Path, n: int = 8) -> str:
    folder.mkdir(parents=True)
    table = pa.table(
        {"has_image": [True] * n, "has_profile": [True] * n, "label": pa.array([None] * n, pa.string())}
    )
    pq.write_table(table, folder / "part-00000.parquet")
    return str(folder)


def test_pretrain_checks_the_resources_of_a_local_cluster_before_training(tmp_path, monkeypatch):
    started = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(xmodal.runtime, "init_ray", lambda address=None: started.append(address))
    monkeypatch.setattr(trainer, "build_trainer", lambda *a, **k: pytest.fail("training started"))
    cluster(monkeypatch, 2)
    cfg = load_config(
        None,
        [
            f"data.train={write_pool(tmp_path / 'pool')}",
            "optim.batch_size=8",
            "train.cpus_per_worker=1",
            f"train.storage_path={tmp_path / 'runs'}",
        ],
    )
    with pytest.raises(ConfigError, match="train.cpus_per_worker=0.5"):
        pretrain(cfg, name="r")
    assert started == [None]


def run_with_checkpoint(storage: Path, name: str, sets: list[str]) -> Path:
    folder = storage / name / "checkpoint_2026-01-01_00-00-00.000000"
    save_checkpoint(folder, load_config(None, sets), torch.nn.Linear(1, 1), 1, 1)
    return folder


def test_a_run_name_reused_with_another_model_is_refused_before_ray(tmp_path, monkeypatch):
    monkeypatch.setattr(xmodal.runtime, "init_ray", lambda *a, **k: pytest.fail("Ray was started"))
    storage = tmp_path / "runs"
    folder = run_with_checkpoint(storage, "reuse", [])
    cfg = load_config(
        None,
        [
            f"data.train={write_pool(tmp_path / 'pool')}",
            "optim.batch_size=8",
            f"train.storage_path={storage}",
            "model.embed_dim=64",
            "model.profile_kwargs.blocks=[1, 1]",
        ],
    )
    with pytest.raises(ConfigError) as e:
        pretrain(cfg, name="reuse")
    message = str(e.value)
    assert message.startswith(f"run 'reuse' ({storage / 'reuse'}) was trained with other model/loss settings")
    assert "settings and re-running its name resumes it: model.embed_dim 128 -> 64; " in message
    assert "model.profile_kwargs.blocks '(unset)' -> [1, 1]; pick another --name" in message
    assert "another --name" in message and f"--config {folder / 'config.yaml'}" in message
    assert "\n" not in message


def test_the_same_model_or_another_initial_weights_file_resumes(tmp_path):
    storage = tmp_path / "runs"
    run_with_checkpoint(storage, "same", ["model.pretrained_path=/gone/init.pth", "optim.lr=0.1"])
    # optimizer settings may change on resume (the loop applies them); the initial weights are never read
    check_resumable(load_config(None), "same", str(storage / "same"))
    check_resumable(load_config(None), "new", str(storage / "new"))  # no run yet


def test_a_run_name_reused_with_another_optimizer_is_refused(tmp_path):
    """sgd -> adamw on resume: the saved SGD state has no 'step' (KeyError in every worker)."""
    storage = tmp_path / "runs"
    folder = run_with_checkpoint(storage, "opt", ["optim.name=sgd", "optim.lr=0.01"])
    check_resumable(load_config(None, ["optim.name=sgd", "optim.lr=0.05"]), "opt", str(storage / "opt"))
    with pytest.raises(ConfigError) as e:
        check_resumable(load_config(None, ["optim.name=adamw"]), "opt", str(storage / "opt"))
    message = str(e.value)
    assert message.startswith(
        f"run 'opt' ({storage / 'opt'}) was trained with other model/loss/optimizer settings"
    )
    assert "resumes it: optim.name 'sgd' -> 'adamw'; pick another --name" in message
    assert f"--config {folder / 'config.yaml'}" in message and "\n" not in message


class FakeTrainer:
    """What Ray Train gave a 2-epoch DINO run without data.val when it ranked by -train_loss: its
    rising loss made epoch 1 the best."""

    def __init__(self, run_dir: Path):
        ck = [SimpleNamespace(path=str(run_dir / f"checkpoint_{e}")) for e in (1, 2)]
        self.result = SimpleNamespace(
            metrics={"epoch": 2, "train_loss": 2.0},
            checkpoint=ck[1],
            best_checkpoints=[
                (ck[0], {"epoch": 1, "val_score": -1.0}),
                (ck[1], {"epoch": 2, "val_score": -2.0}),
            ],
        )

    def fit(self):
        return self.result


def test_without_a_validation_set_the_best_checkpoint_is_the_last(tmp_path, monkeypatch, capsys):
    storage = tmp_path / "runs"
    monkeypatch.setattr(xmodal.runtime, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(trainer, "check_resources", lambda *a, **k: None)
    monkeypatch.setattr(
        trainer, "build_trainer", lambda cfg, name, **_: (FakeTrainer(storage / name), str(storage))
    )
    cfg = load_config(
        None,
        [
            f"data.train={write_pool(tmp_path / 'pool')}",
            "optim.batch_size=8",
            f"train.storage_path={storage}",
        ],
    )
    result = pretrain(cfg, name="noval")
    assert result.best_checkpoint == str(storage / "noval" / "checkpoint_2")
    summary = json.loads((storage / "noval" / "summary.json").read_text())
    assert summary["best_checkpoint"] == result.best_checkpoint and summary["best_metrics"]["epoch"] == 2
    assert summary["best_by"] == "no data.val: best = last"
    assert "no data.val: best = last" in capsys.readouterr().out


def test_without_a_validation_set_ray_keeps_the_latest_checkpoint(tmp_path, monkeypatch):
    import xmodal.data.pipeline as pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "train_dataset", lambda *a, **k: seen.update(k))
    cfg = load_config(
        None,
        [
            f"data.train={write_pool(tmp_path / 'pool')}",
            "optim.batch_size=8",
            "model.center_particles=0",
            f"train.storage_path={tmp_path / 'runs'}",
        ],
    )
    built, _ = trainer.build_trainer(cfg, "noval")
    assert built.run_config.checkpoint_config.checkpoint_score_attribute is None
    assert seen["paired"] is True
