"""The per-epoch validation score (xmodal/train/validate.py), which picks the best checkpoint: the
gallery k-NN protocol's mean over ``eval.val_repeats`` draws, computed here independently."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xmodal.config import load_config
from xmodal.data.pipeline import load_labelled
from xmodal.data.synth import synthesize
from xmodal.eval.embed import embed_arrays, embedding_set
from xmodal.eval.protocol import gallery_score
from xmodal.models.build import build_model
from xmodal.train.trainer import build_trainer
from xmodal.train.validate import validate

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def val_set(tmp_path_factory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("val")
    synthesize(root, n_lab=90, n_sea=0, n_uto=0, seed=2, fmt="parquet", image_size=24)
    return load_labelled(str(root / "LAB"), 16, 16), root


def config(**sets):
    base = {"data.image_size": 16, "data.profile_length": 16, "model.embed_dim": 8, "eval.val_n": 2}
    return load_config(None, [f"{k}={v}" for k, v in (base | sets).items()])


@pytest.mark.parametrize("repeats", [1, 7])
def test_the_score_is_the_protocol_mean_over_val_repeats(val_set, repeats) -> None:
    val, _ = val_set
    cfg = config(**{"eval.val_repeats": repeats})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    out = validate(model, val, cfg, CPU)
    es = embedding_set(val, embed_arrays(model, val, CPU))
    for combo in ("I-I", "P-P", "I+P-I+P"):
        expected = gallery_score(es, combo=combo, n=2, k=cfg.eval.k, repeats=repeats, seed=cfg.eval.seed)
        assert out[f"val_{combo}"] == pytest.approx(expected, abs=1e-12)
    assert out["val_score"] == out["val_I+P-I+P"]


@pytest.mark.parametrize("key", ["eval.val_repeats", "eval.val_n"])
def test_a_score_of_no_draws_is_refused_before_training(val_set, key) -> None:
    _, root = val_set
    cfg = config(**{key: 0, "data.train": root / "LAB"})
    with pytest.raises(ValueError, match=f"{key.split('.')[1]}.*must be >= 1"):
        build_trainer(cfg, "never")
