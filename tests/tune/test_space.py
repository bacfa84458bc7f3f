"""Search-space files: the shipped spaces load and validate; malformed spaces are rejected before
any trial with the offending key named; the define-by-run function samples exactly the active
parameters from the declared distributions, and a trial's config is the base with them applied."""

from __future__ import annotations

import copy
import math

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from xmodal.config import ConfigError, apply_overrides, config_from_dict, load_config
from xmodal.tune.space import load_space, parse_space

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize("name", ["laptop", "paper", "wide"])
def test_shipped_spaces_validate(name, tune_helpers):
    space = load_space(tune_helpers.repo / "tune_spaces" / f"{name}.yaml")
    base = space.base_dict()
    space.validate(base)
    assert base["data"]["val"], "a sweep space must name a labelled validation set"
    assert space.trials >= 4


def test_paper_space_spans_the_papers_grid(tune_helpers):
    space = load_space(tune_helpers.repo / "tune_spaces" / "paper.yaml")
    params = {p.key: p for p in space.params}
    assert set(params["model.image_encoder"].choices) == {
        "efficientnet_b0",
        "convnext_femto",
        "vit_tiny_patch16_224",
    }
    assert set(params["model.profile_encoder"].choices) == {"cnn", "lstm", "transformer"}
    assert set(params["loss.name"].choices) == {"clip", "siglip"}
    assert params["loss.logit_scale"].low <= math.e <= params["loss.logit_scale"].high
    assert params["model.profile_kwargs.depth"].when == {"model.profile_encoder": ("transformer",)}
    assert params["loss.logit_bias"].when == {"loss.name": ("siglip",)}
    assert "optim.lr" in params


def test_laptop_space_base_is_the_laptop_config(tune_helpers):
    space = load_space(tune_helpers.repo / "tune_spaces" / "laptop.yaml")
    laptop = load_config(tune_helpers.repo / "configs" / "laptop.yaml").to_dict()
    expected = config_from_dict(apply_overrides(laptop, space.fixed)).to_dict()
    assert space.base_dict() == expected


SPACE = {
    "fixed": {"data.val": "val", "optim.epochs": 3},
    "params": {
        "model.profile_encoder": {"choice": ["cnn", "lstm", "transformer"]},
        "model.profile_kwargs.depth": {"int": [1, 4], "when": {"model.profile_encoder": "transformer"}},
        "model.profile_kwargs.blocks": {
            "choice": [[1, 1], [2, 2, 2]],
            "when": {"model.profile_encoder": "cnn"},
        },
        "loss.name": {"choice": ["clip", "siglip"]},
        "loss.logit_bias": {"uniform": [-12.0, -4.0], "step": 0.5, "when": {"loss.name": "siglip"}},
        "loss.logit_scale": {"loguniform": [1.0, 30.0]},
        "optim.lr": {"loguniform": ["1e-4", 1.0e-2]},  # YAML 1.1 reads 1e-4 as text
        "optim.batch_size": {"int": [64, 256], "step": 64},
    },
}


def bad(space: dict, **changes) -> dict:
    out = copy.deepcopy(space)
    for dotted, value in changes.items():
        section, key = dotted.split("/")
        if value is None:
            out[section].pop(key)
        else:
            out[section][key] = value
    return out


def reject(tmp_path, data, *needles):
    space = parse_space(data, tmp_path / "s.yaml")
    with pytest.raises(ConfigError) as e:
        space.validate(space.base_dict())
    for n in needles:
        assert n in str(e.value), str(e.value)


def reject_parse(tmp_path, data, *needles):
    with pytest.raises(ConfigError) as e:
        parse_space(data, tmp_path / "s.yaml")
    for n in needles:
        assert n in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "changes, needles",
    [
        ({"params/optim.lrr": {"uniform": [0.1, 1.0]}}, ["optim.lrr", "'lrr' is not in optim", "lr"]),
        ({"params/optim": {"uniform": [0.1, 1.0]}}, ["'optim' is a config section"]),
        ({"params/optim.lr.x": {"uniform": [0.1, 1.0]}}, ["'optim.lr' is a value"]),
        ({"params/optim.lr": {"normal": [0.0, 1.0]}}, ["params.optim.lr", "unknown field", "normal"]),
        ({"params/optim.lr": {"uniform": [0.1, 1.0], "choice": [1]}}, ["params.optim.lr", "exactly one"]),
        ({"params/optim.lr": {"uniform": [0.5, 0.1]}}, ["params.optim.lr", "low 0.5 > high 0.1"]),
        ({"params/optim.lr": {"loguniform": [0.0, 0.1]}}, ["params.optim.lr", "low > 0"]),
        ({"params/optim.lr": {"uniform": [0.1]}}, ["params.optim.lr", "[low, high]"]),
        ({"params/optim.lr": {"uniform": ["fast", 0.1]}}, ["params.optim.lr", "'fast'"]),
        ({"params/optim.lr": {"choice": []}}, ["params.optim.lr", "non-empty list"]),
        ({"params/optim.lr": 0.1}, ["params.optim.lr", "expected a mapping"]),
        ({"params/optim.batch_size": {"int": [64.5, 256]}}, ["params.optim.batch_size", "whole numbers"]),
        ({"params/optim.batch_size": {"int": [64, 256], "step": 0}}, ["params.optim.batch_size", "step"]),
        (
            {"params/optim.lr": {"loguniform": [1e-4, 1e-2], "step": 1e-3}},
            ["params.optim.lr", "not loguniform"],
        ),
        (
            {"params/loss.logit_bias": {"uniform": [-12.0, -4.0], "when": {"loss.nam": "siglip"}}},
            ["params.loss.logit_bias.when", "'loss.nam'", "declared above"],
        ),
        (
            {"params/loss.logit_bias": {"uniform": [-12.0, -4.0], "when": {"loss.name": "sigmoid"}}},
            ["params.loss.logit_bias.when", "['sigmoid']", "clip"],
        ),
        (
            {"params/loss.logit_bias": {"uniform": [-12.0, -4.0], "when": {"optim.lr": 0.1}}},
            ["'optim.lr' must be a choice parameter"],
        ),
        ({"fixed/optim.lr": 0.1}, ["'optim.lr' is both fixed and searched"]),
        ({"fixed/train": {"seed": 1}}, ["fixed.train", "config section"]),
        ({"fixed/optim.lrate": 0.1}, ["fixed.optim.lrate", "unknown config key"]),
    ],
)
def test_malformed_spaces_name_the_key_at_parse_time(tmp_path, changes, needles):
    reject_parse(tmp_path, bad(SPACE, **changes), *needles)


@pytest.mark.parametrize(
    "changes, needles",
    [
        (
            {"params/model.image_encoder": {"choice": ["resnet10t", "convnext_femtoo"]}},
            ["model.image_encoder", "'convnext_femtoo'", "timm"],
        ),
        (
            {"params/model.profile_encoder": {"choice": ["cnn", "transformer", "gru"]}},
            ["model.profile_encoder", "'gru'", "lstm"],
        ),
        ({"params/loss.name": {"choice": ["clip", "siglip", "infonce"]}}, ["loss.name", "'infonce'", "dino"]),
        (
            {"params/model.profile_kwargs.depth": {"int": [1, 4]}},
            ["model.profile_kwargs.depth", "'cnn'", "'depth'"],
        ),
        (
            {
                "params/model.profile_kwargs.depth": {
                    "int": [1, 4],
                    "when": {"model.profile_encoder": ["lstm"]},
                }
            },
            ["profile encoder 'lstm' takes no argument 'depth'", "hidden"],
        ),
        (
            {"fixed/model.profile_kwargs.hidden": 64},
            ["model.profile_kwargs.hidden (fixed", "'cnn' takes no argument 'hidden'"],
        ),
        (
            {"params/optim.grad_accum": {"uniform": [1, 4]}},
            ["params.optim.grad_accum", "1.0", "expected int"],
        ),
        ({"params/optim.lr": {"choice": ["fast"]}}, ["params.optim.lr", "'fast'", "expected float"]),
        ({"params/train.use_gpu": {"choice": [0, 1]}}, ["params.train.use_gpu", "true/false"]),
    ],
)
def test_malformed_spaces_name_the_key_before_any_trial(tmp_path, changes, needles):
    reject(tmp_path, bad(SPACE, **changes), *needles)


def test_top_level_and_search_keys_are_checked(tmp_path):
    reject_parse(tmp_path, {**SPACE, "param": {}}, "unknown top-level key(s) ['param']")
    reject_parse(tmp_path, {**SPACE, "search": {"sed": 1}}, "search: unknown key(s) ['sed']")
    reject_parse(tmp_path, {**SPACE, "search": {"reduction_factor": 1}}, "search.reduction_factor", ">= 2")
    reject_parse(tmp_path, {**SPACE, "trials": 0}, "trials: must be a positive whole number")
    reject_parse(tmp_path, {"fixed": {}}, "params: must map at least one")
    reject_parse(tmp_path, [1, 2], "a space file is a mapping")


def test_missing_file_and_base_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="search space file not found"):
        load_space(tmp_path / "nope.yaml")
    space = parse_space({**SPACE, "base": "missing.yaml"}, tmp_path / "s.yaml")
    with pytest.raises(ConfigError, match="base config .*missing.yaml not found"):
        space.base_dict()


def test_overrides_may_not_touch_searched_keys(tmp_path):
    space = parse_space(SPACE, tmp_path / "s.yaml")
    with pytest.raises(ConfigError, match=r"\['optim.lr'\] are searched"):
        space.base_dict(overrides=["optim.lr=0.1"])
    base = space.base_dict(overrides=["optim.momentum=0.5", "data.val=other"])
    assert (
        base["optim"]["momentum"] == 0.5 and base["data"]["val"] == "other" and base["optim"]["epochs"] == 3
    )


def test_define_by_run_samples_active_parameters_from_their_distributions(tmp_path):
    space = parse_space(SPACE, tmp_path / "s.yaml")
    base = space.base_dict()
    space.validate(base)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen_encoders, seen_blocks = set(), set()
    for _ in range(60):
        trial = study.ask()
        values = space.suggest(trial)
        study.tell(trial, 0.0)
        frozen = study.trials[-1]
        enc, loss = values["model.profile_encoder"], values["loss.name"]
        seen_encoders.add(enc)
        # exactly the parameters whose conditions hold are sampled
        assert ("model.profile_kwargs.depth" in values) == (enc == "transformer")
        assert ("model.profile_kwargs.blocks" in values) == (enc == "cnn")
        assert ("loss.logit_bias" in values) == (loss == "siglip")
        assert set(frozen.params) == set(values)
        d = frozen.distributions
        assert d["optim.lr"] == FloatDistribution(1e-4, 1e-2, log=True)
        assert d["loss.logit_scale"] == FloatDistribution(1.0, 30.0, log=True)
        assert d["optim.batch_size"] == IntDistribution(64, 256, step=64)
        assert isinstance(d["model.profile_encoder"], CategoricalDistribution)
        assert 1e-4 <= values["optim.lr"] <= 1e-2 and values["optim.batch_size"] in (64, 128, 192, 256)
        if loss == "siglip":
            assert d["loss.logit_bias"] == FloatDistribution(-12.0, -4.0, step=0.5)
            assert (values["loss.logit_bias"] * 2).is_integer()
        if enc == "cnn":
            # list choices are stored by Optuna as their YAML text and decoded back to lists
            assert frozen.params["model.profile_kwargs.blocks"] in ("[1, 1]", "[2, 2, 2]")
            assert values["model.profile_kwargs.blocks"] in ([1, 1], [2, 2, 2])
            seen_blocks.add(tuple(values["model.profile_kwargs.blocks"]))
        assert space.decode(frozen.params) == values
        cfg = space.config(base, values)
        assert cfg.optim.lr == values["optim.lr"] and cfg.optim.epochs == 3 and cfg.loss.name == loss
        assert cfg.model.profile_kwargs == {
            k.split(".")[-1]: v for k, v in values.items() if k.startswith("model.profile_kwargs.")
        }
    assert seen_encoders == {"cnn", "lstm", "transformer"} and seen_blocks == {(1, 1), (2, 2, 2)}


def test_enqueued_parameters_are_replayed_exactly(tmp_path):
    """What --resume relies on: a queued trial's stored params give the same decoded values."""
    space = parse_space(SPACE, tmp_path / "s.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    first = study.ask()
    values = space.suggest(first)
    study.enqueue_trial(first.params)
    again = study.ask()
    assert space.suggest(again) == values


def test_space_files_read_numbers_without_a_dot_as_floats(tmp_path):
    """YAML 1.1 reads 1e-4 as text: in a space file, free-form kwargs would reach the model as text."""
    (tmp_path / "base.yaml").write_text("optim:\n  weight_decay: 1e-4\n")
    (tmp_path / "s.yaml").write_text(
        "base: base.yaml\n"
        "fixed:\n  loss.name: dino\n  loss.kwargs: {teacher_temp: 4e-2}\n"
        "params:\n  optim.lr: {loguniform: [1e-4, 1e-2]}\n"
    )
    space = load_space(tmp_path / "s.yaml")
    base = space.base_dict()
    assert base["optim"]["weight_decay"] == 1e-4 and base["loss"]["kwargs"]["teacher_temp"] == 0.04
    assert isinstance(base["loss"]["kwargs"]["teacher_temp"], float)


@pytest.mark.parametrize(
    "spec, largest",
    [
        ({"choice": [2, 5, 3]}, 5),  # a choice has no bounds: its largest value
        ({"int": [1, 4]}, 4),
        # a conditional parameter leaves the base's epochs (the default, 4) to the trials without it
        ({"choice": [1, 2], "when": {"loss.name": "siglip"}}, 4),
    ],
)
def test_asha_gets_the_most_epochs_a_trial_trains(tmp_path, spec, largest):
    data = copy.deepcopy(SPACE)
    data["params"]["optim.epochs"] = spec
    data["fixed"].pop("optim.epochs")
    space = parse_space(data, tmp_path / "s.yaml")
    base = space.base_dict()
    space.validate(base)
    assert space.largest("optim.epochs", base) == largest


def test_asha_gets_the_base_epochs_when_they_are_not_searched(tmp_path):
    space = parse_space(SPACE, tmp_path / "s.yaml")
    assert space.largest("optim.epochs", space.base_dict()) == 3


def test_grace_period_beyond_the_epochs_is_rejected_before_any_trial(tmp_path):
    reject(
        tmp_path,
        {**SPACE, "search": {"grace_period": 4}},
        "search.grace_period=4",
        "optim.epochs, at most 3",
        "lower search.grace_period",
    )
    data = bad(SPACE, **{"fixed/optim.epochs": None, "params/optim.epochs": {"choice": [2, 4]}})
    space = parse_space({**data, "search": {"grace_period": 4}}, tmp_path / "s.yaml")
    space.validate(space.base_dict())  # the trials given 4 epochs reach the first rung


@pytest.mark.parametrize(
    "changes, needles",
    [
        (
            {"fixed/train.num_workers": 2, "params/optim.batch_size": {"choice": [96, 100, 127]}},
            ["params.optim.batch_size", "given 127", "divisible by train.num_workers"],
        ),
        (
            {"params/loss.logit_scale": {"loguniform": [1.0, 150.0]}},
            ["params.loss.logit_scale", "given 150.0", "loss.max_logit_scale=100"],
        ),
        (
            {"params/loss.logit_scale": None, "fixed/loss.logit_scale": 200.0},
            ["the base config (base:, fixed:, --set, --gpus-per-trial)", "loss.logit_scale=200"],
        ),
        (
            {"fixed/optim.epochs": None, "params/optim.epochs": {"choice": [0, 2]}},
            ["params.optim.epochs", "given 0", "optim.epochs must be >= 1"],
        ),
    ],
)
def test_training_checks_of_every_trial_run_before_any_trial(tmp_path, changes, needles):
    reject(tmp_path, bad(SPACE, **changes), *needles)


def test_gpus_per_trial_workers_are_checked_against_the_searched_batch_sizes(tune_helpers):
    """What ``xmodal tune --space tune_spaces/wide.yaml --gpus-per-trial 3`` validates."""
    space = load_space(tune_helpers.repo / "tune_spaces" / "wide.yaml")
    base = space.base_dict(None, {"train.use_gpu": True, "train.num_workers": 3})
    with pytest.raises(ConfigError) as e:
        space.validate(base)
    assert "params.optim.batch_size: a trial given 256" in str(e.value), str(e.value)
    assert "train.num_workers x optim.grad_accum = 3 x 1" in str(e.value)


def test_a_searched_key_is_not_checked_at_its_base_value(tmp_path):
    """Every trial sets an unconditional parameter: the base's batch size (128, not divisible by
    3 workers, and --set may not change a searched key) never trains."""
    data = bad(SPACE, **{"fixed/train.num_workers": 3, "params/optim.batch_size": {"choice": [63, 66]}})
    space = parse_space(data, tmp_path / "s.yaml")
    base = space.base_dict()
    assert base["optim"]["batch_size"] % 3
    space.validate(base)
