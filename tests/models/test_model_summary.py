"""``model_table``: parameter counts and forward FLOPs against textbook formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xmodal.config import ConfigError
from xmodal.data.schema import N_CHANNELS
from xmodal.models.profile import ProfileLSTM, ProfileTransformer
from xmodal.models.summary import IMAGE_ENCODER_NAMES, forward_flops, model_table


def test_linear_flops_are_two_per_multiply_add() -> None:
    assert forward_flops(nn.Linear(10, 20), torch.zeros(1, 10)) == 2 * 10 * 20


def test_lstm_flops_follow_the_gate_equations() -> None:
    c, h, length = N_CHANNELS, 8, 30
    enc = ProfileLSTM(c, length, hidden=h, layers=2)
    # Per step, direction and layer: 4 gates, each W_i x (in inputs) + W_h h (h inputs).
    expected = sum(2 * length * 2 * 4 * h * (n_in + h) for n_in in (c, 2 * h))
    flops = forward_flops(enc, torch.zeros(1, c, length), torch.ones(1, length, dtype=torch.bool))
    assert flops == expected


def test_transformer_flops_include_attention() -> None:
    c, d, length = N_CHANNELS, 16, 20
    enc = ProfileTransformer(c, length, width=d, depth=1, heads=2, mlp_ratio=4.0)
    t = length + 1  # with the CLS token
    per_layer = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * 4 * d
    expected = 2 * length * c * d + per_layer
    flops = forward_flops(enc, torch.zeros(1, c, length), torch.ones(1, length, dtype=torch.bool))
    assert flops == expected


def test_table_lists_the_paper_encoders_and_every_profile_encoder() -> None:
    assert {"efficientnet_b0", "convnext_femto", "vit_tiny_patch16_224", "resnet18", "resnet10t"} <= set(
        IMAGE_ENCODER_NAMES
    )
    rows = model_table(32, 48, image_encoders=("resnet10t",))
    by_name = {r["name"]: r for r in rows}
    assert {"resnet10t", "cnn", "lstm", "transformer"} <= set(by_name)
    assert all(list(r) == list(rows[0]) for r in rows)  # one set of columns for the CLI table
    assert by_name["resnet10t"]["params"] == 4_922_056  # timm's resnet10t with a 1-channel stem
    assert by_name["resnet10t"]["input"] == "1x32x32" and by_name["cnn"]["input"] == "6x48"
    for r in rows:
        assert r["params"] > 0 and r["gflops"] > 0 and r["out_dim"] > 0
    assert by_name["lstm"]["gflops"] == pytest.approx(
        sum(2 * 48 * 2 * 4 * 128 * (n + 128) for n in (N_CHANNELS, 256)) / 1e9, abs=1e-4
    )


def test_an_encoder_that_cannot_take_the_size_gets_a_row_saying_so() -> None:
    rows = model_table(24, 16, image_encoders=("resnet10t", "convnext_femto"))  # convnext needs >= 32 px
    by_name = {r["name"]: r for r in rows}
    femto = by_name["convnext_femto"]
    assert femto["input"] == "cannot take 24 px"
    assert [femto[k] for k in ("out_dim", "params", "params_m", "gflops")] == ["-"] * 4
    assert by_name["resnet10t"]["input"] == "1x24x24" and by_name["resnet10t"]["params"] > 0
    assert {"cnn", "lstm", "transformer"} <= set(by_name)
    assert all(list(r) == list(rows[0]) for r in rows)


def test_cli_prints_one_line_for_a_bad_profile_length(capsys) -> None:
    from xmodal.cli import main

    with pytest.raises(ConfigError, match="--profile-length must be >= 1"):
        model_table(32, 0, image_encoders=())
    assert main(["models", "--profile-length", "0"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "--profile-length must be >= 1 (got 0)" in err
