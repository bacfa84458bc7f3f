import pytest

from xmodal.config import Config, ConfigError, apply_overrides, config_from_dict, load_config, save_config


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


def test_numbers_without_a_dot_are_floats_in_files_and_overrides(tmp_path):
    # PyYAML reads YAML 1.1, where 1e-3 (no dot) and 1.0e3 (no exponent sign) are text
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 1e-3\n  weight_decay: 1.0e4\n  epochs: 3\n")
    sets = [
        "loss.logit_scale=1e2",
        "optim.momentum=9E-1",
        "loss.kwargs.teacher_temp=4e-2",
        "loss.kwargs.n=10",
    ]
    cfg = load_config(p, sets)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.loss.logit_scale) == (float("1e-3"), 1e4, 100.0)
    assert cfg.optim.momentum == float("9E-1") and cfg.optim.epochs == 3
    assert cfg.loss.kwargs == {"teacher_temp": float("4e-2"), "n": 10}  # free-form: typed by YAML alone
    assert isinstance(cfg.loss.kwargs["n"], int)


def test_numeric_text_is_a_float_and_non_finite_floats_are_refused():
    # a value read by a plain YAML 1.1 reader (a sweep's fixed: values) arrives as text
    assert config_from_dict(apply_overrides({}, {"optim.lr": "1e-4"})).optim.lr == float("1e-4")
    for value in (".nan", ".inf", "-.inf"):
        with pytest.raises(ConfigError, match=f"--set optim.lr={value}: expected a finite float"):
            load_config(None, [f"optim.lr={value}"])
    with pytest.raises(ConfigError, match="--set optim.lr=fast: expected float, got 'fast'"):
        load_config(None, ["optim.lr=fast"])


@pytest.mark.parametrize("text", ["123", "0123", "1e3", "true", "null", "2026-01-31"])
def test_text_fields_take_the_override_as_written(text):
    cfg = load_config(None, [f"train.name={text}", f"data.val={text}"])
    assert cfg.train.name == text and cfg.data.val == text


def test_a_number_for_a_text_field_in_a_file_says_how_to_quote_it(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  name: 123\n")
    with pytest.raises(
        ConfigError, match="train.name: expected str, got 123 .YAML read a number: quote the text"
    ):
        load_config(p)
    assert load_config(None, ["train.name='a b'"]).train.name == "a b"


def test_small_floats_round_trip(tmp_path):
    cfg = load_config(None, ["optim.lr=1e-10", "optim.weight_decay=2.5E-7"])
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg


@pytest.fixture
def laptop_like(tmp_path):
    p = tmp_path / "laptop.yaml"
    p.write_text("optim:\n  lr: 0.002\n  epochs: 3\n")
    return p


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lr=abc", "--set optim.lr=abc: expected float, got 'abc'"),
        ("optim.epochs=1.5", "--set optim.epochs=1.5: expected int, got 1.5"),
        ("optim.lrr=1", "--set optim.lrr=1: optim: unknown key(s) ['lrr']"),
        ("foo.bar=1", "--set foo.bar=1: unknown section(s) ['foo']; valid sections: ['data', 'eval'"),
    ],
)
def test_a_bad_override_is_blamed_on_the_override_not_the_file(laptop_like, override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(laptop_like, ["optim.epochs=2", override, "train.name=x"])
    assert str(e.value).startswith(expected)
    assert "laptop.yaml" not in str(e.value) and ": :" not in str(e.value)


def test_a_bad_value_in_the_file_is_blamed_on_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: abc\nfoo: {bar: 1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["optim.lr=0.1"])
    assert str(e.value).startswith(f"{p}: unknown section(s) ['foo']; valid sections:")
    p.write_text("optim:\n  lr: abc\n")
    with pytest.raises(ConfigError, match=r"c.yaml: optim.lr: expected float, got 'abc'"):
        load_config(p, ["optim.epochs=2"])


def test_an_override_may_fix_a_bad_value_in_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: fast\n  epochs: 3\n")
    assert load_config(p, ["optim.lr=0.01"]).optim.lr == 0.01
    assert load_config(p, {"optim.lr": 0.02}).optim.lr == 0.02
    with pytest.raises(ConfigError, match=r"c.yaml: optim.lr: expected float, got 'fast'"):
        load_config(p, ["optim.epochs=2"])  # not fixed: still the file's error


def test_dict_overrides_name_the_override():
    with pytest.raises(ConfigError, match=r"^override optim.lr='abc': expected float"):
        load_config(None, {"optim.lr": "abc"})
