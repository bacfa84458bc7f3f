"""Shared helpers for the sweep tests, handed out as fixtures (tests run with
``--import-mode=importlib``, so a helper module could not be imported): writing space files, a tiny
synthetic dataset, and a finished Optuna study made through the space's define-by-run function."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def write_space(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tiny_space(data_dir: Path, **extra) -> dict:
    """A space that trains in seconds per epoch on 2 CPU cores (24 px, tiny encoders, one worker)."""
    space = {
        "trials": 4,
        "fixed": {
            "data.train": str(data_dir / "UTO"),
            "data.val": str(data_dir / "LAB"),
            "data.image_size": 24,
            "data.profile_length": 32,
            "data.val_max_particles": 160,
            "model.embed_dim": 32,
            "optim.epochs": 2,
            "optim.batch_size": 64,
            "train.num_workers": 1,
            "train.cpus_per_worker": 1,
            "train.max_failures": 0,
            "train.log_every": 100,
            "eval.val_n": 2,
            "eval.gallery_sizes": [1, 2, 4],
            "eval.repeats": 2,
        },
        "params": {
            "model.image_encoder": {"choice": ["test_efficientnet", "test_resnet"]},
            "model.profile_encoder": {"choice": ["cnn", "transformer"]},
            "model.profile_kwargs.base_channels": {"choice": [8], "when": {"model.profile_encoder": "cnn"}},
            "model.profile_kwargs.blocks": {"choice": [[1, 1]], "when": {"model.profile_encoder": "cnn"}},
            "model.profile_kwargs.width": {"choice": [16], "when": {"model.profile_encoder": "transformer"}},
            "model.profile_kwargs.heads": {"choice": [2], "when": {"model.profile_encoder": "transformer"}},
            "model.profile_kwargs.depth": {"int": [1, 2], "when": {"model.profile_encoder": "transformer"}},
            "loss.name": {"choice": ["clip", "siglip"]},
            "loss.logit_scale": {"loguniform": [1.0, 20.0]},
            "optim.lr": {"loguniform": [1.0e-3, 1.0e-2]},
        },
        "search": {"seed": 0, "grace_period": 1, "reduction_factor": 2},
    }
    for k, v in extra.items():
        space[k] = {**space.get(k, {}), **v} if isinstance(v, dict) else v
    return space


def scored_study(space, storage: str, name: str, n: int, seed: int = 0):
    """An Optuna study whose ``n`` trials were sampled by ``DefineByRun`` and told a made-up score."""
    import optuna

    from xmodal.tune.runner import DefineByRun

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        direction="maximize",
        sampler=optuna.samplers.RandomSampler(seed=seed),
    )
    define = DefineByRun(space)
    for i in range(n):
        trial = study.ask()
        define(trial)
        study.tell(trial, 0.2 + 0.1 * i)
    return study


@pytest.fixture
def tune_helpers() -> SimpleNamespace:
    return SimpleNamespace(
        write_space=write_space, tiny_space=tiny_space, scored_study=scored_study, repo=REPO
    )


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from xmodal.data.synth import synthesize

    out = tmp_path_factory.mktemp("tune_data")
    synthesize(out, n_lab=160, n_sea=0, n_uto=256, seed=1, fmt="parquet", image_size=32)
    return out
