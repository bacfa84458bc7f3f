import pytest

from xmodal.config import Config, ConfigError, apply_overrides, load_config, save_config


def test_defaults_are_the_laptop_config():
    cfg = load_config()
    assert cfg.train.use_gpu is False
    assert cfg.loss.logit_scale == pytest.approx(1 / 0.07)


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 0.1\n  epochs: 3\nmodel:\n  profile_encoder: lstm\n")
    cfg = load_config(p, ["optim.lr=0.01", "eval.gallery_sizes=[1, 2]", "model.profile_kwargs={hidden: 32}"])
    assert cfg.optim.lr == 0.01 and cfg.optim.epochs == 3
    assert cfg.model.profile_encoder == "lstm"
    assert cfg.eval.gallery_sizes == [1, 2]
    assert cfg.model.profile_kwargs == {"hidden": 32}


def test_int_accepted_for_float_and_round_trip(tmp_path):
    cfg = load_config(None, ["optim.lr=1"])
    assert isinstance(cfg.optim.lr, float)
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "optim.lrr"),
        ("optim.epochs=abc", "optim.epochs"),
        ("train.use_gpu=3", "train.use_gpu"),
        ("nosection.x=1", "nosection"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.split(".")[0]) as e:
        load_config(None, [override])
    assert message.split(".")[-1] in str(e.value)


def test_unknown_key_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  momentun: 0.9\n")
    with pytest.raises(ConfigError, match="bad.yaml.*momentun"):
        load_config(p)


def test_apply_overrides_does_not_mutate():
    base = Config().to_dict()
    out = apply_overrides(base, {"optim.lr": 5.0})
    assert base["optim"]["lr"] != 5.0 and out["optim"]["lr"] == 5.0
