"""Declarative search spaces (``tune_spaces/*.yaml``): parsing, validation before any trial, and
the Optuna define-by-run function that samples one trial's parameters.

A space file::

    base: ../configs/laptop.yaml    # optional base config, relative to this file
    trials: 4                       # default number of trials (``--trials`` overrides)
    fixed:                          # dotted config keys set for every trial
      optim.epochs: 2
    params:                         # dotted config keys searched, in this order
      model.profile_encoder: {choice: [cnn, lstm, transformer]}
      model.profile_kwargs.depth: {int: [1, 4], when: {model.profile_encoder: transformer}}
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
    search: {seed: 0, startup_trials: 10, grace_period: 1, reduction_factor: 2}

Distributions: ``choice: [v, ...]``, ``uniform: [low, high]`` (optional ``step``),
``loguniform: [low, high]``, ``int: [low, high]`` (optional ``step``). ``when: {key: value or
[values]}`` samples a parameter only when every named earlier choice parameter has one of the values
(a single-value ``choice`` under ``when`` is a conditional constant).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xmodal.config import Config, ConfigError, apply_overrides, config_from_dict, load_yaml, number

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int")
PARAM_KEYS = {*DISTRIBUTIONS, "step", "when"}
SEARCH_DEFAULTS = {"seed": 0, "startup_trials": 10, "grace_period": 1, "reduction_factor": 2}
TOP_KEYS = {"base", "trials", "fixed", "params", "search", "description"}
# Config keys whose values name registered things: checked against the registries before any trial.
NAMED_KEYS = ("model.image_encoder", "model.profile_encoder", "loss.name")
_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Param:
    key: str
    kind: str
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    @property
    def labels(self) -> tuple[Any, ...]:
        """What Optuna stores for each choice: the value itself, or its YAML text for lists/maps
        (Optuna's categorical values must be scalars)."""
        if all(isinstance(c, _SCALARS) for c in self.choices):
            return self.choices
        return tuple(yaml.safe_dump(c, default_flow_style=True).strip() for c in self.choices)

    def suggest(self, trial: Any) -> Any:
        if self.kind == "choice":
            label = trial.suggest_categorical(self.key, list(self.labels))
            return self.decode(label)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1))
        return trial.suggest_float(
            self.key, self.low, self.high, step=self.step, log=self.kind == "loguniform"
        )

    def decode(self, stored: Any) -> Any:
        if self.kind != "choice":
            return stored
        return self.choices[self.labels.index(stored)]

    def probe_values(self) -> list[Any]:
        """Values that exercise the config type check: every choice, or both bounds."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]


@dataclass
class Space:
    path: Path
    text: str
    params: list[Param]
    fixed: dict[str, Any]
    trials: int
    search: dict[str, int]
    base: Path | None = None

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def active(self, param: Param, values: dict[str, Any]) -> bool:
        return all(k in values and values[k] in allowed for k, allowed in param.when.items())

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Optuna define-by-run: sample the active parameters in file order (decoded values)."""
        values: dict[str, Any] = {}
        for p in self.params:
            if self.active(p, values):
                values[p.key] = p.suggest(trial)
        return values

    def decode(self, stored: dict[str, Any]) -> dict[str, Any]:
        """Optuna's stored params (or a Tune trial config) -> config values of the active parameters."""
        return {p.key: p.decode(stored[p.key]) for p in self.params if p.key in stored}

    def base_dict(
        self,
        base_config: str | Path | None = None,
        overrides: dict[str, Any] | list[str] | None = None,
    ) -> dict[str, Any]:
        """The config every trial starts from: defaults <- base file <- ``fixed:`` <- overrides."""
        base_path = Path(base_config) if base_config else self.base
        data: dict[str, Any] = {}
        if base_path is not None:
            if not base_path.is_file():
                raise ConfigError(f"{self.path}: base config {base_path} not found")
            data = load_yaml(base_path.read_text()) or {}
        data = apply_overrides(data, self.fixed)
        if overrides:
            data = apply_overrides(data, overrides)
            extra = apply_overrides({}, overrides)
            clash = sorted(k for k in self.keys if _has_path(extra, k))
            if clash:
                raise ConfigError(
                    f"{self.path}: {clash} are searched by the space; remove them from --set "
                    "(or move them to the space's fixed: and out of params:)"
                )
        return config_from_dict(data, where=f"{self.path} (base config)").to_dict()

    def config(self, base: dict[str, Any], params: dict[str, Any], where: str = "trial") -> Config:
        """One trial's full config: the base with the sampled parameters applied."""
        return config_from_dict(apply_overrides(base, params), where=where)

    def validate(self, base: dict[str, Any]) -> None:
        """Checks that need the base config: every searched value fits its config field, names are
        registered, and profile encoder keyword arguments exist. Raises ConfigError naming the key."""
        for p in self.params:
            for v in p.probe_values():
                try:
                    self.config(base, {p.key: v})
                except (ConfigError, TypeError) as e:
                    raise ConfigError(
                        f"{self.path}: params.{p.key}: value {v!r} does not fit the config: {e}"
                    ) from None
        for key in NAMED_KEYS:
            for name in self._possible(key, base):
                _check_name(key, name, self.path)
        # profile encoder arguments: those set for every trial (fixed: or the base file) must suit
        # every encoder the sweep may pick; a searched one those its `when:` allows
        every = self._possible("model.profile_encoder", base)
        for arg in base["model"]["profile_kwargs"]:
            for enc in every:
                _check_profile_kwarg(
                    enc, arg, f"{self.path}: model.profile_kwargs.{arg} (fixed: or base config)"
                )
        for p in self.params:
            if p.key.startswith("model.profile_kwargs."):
                for enc in p.when.get("model.profile_encoder") or every:
                    _check_profile_kwarg(enc, p.key.split(".", 2)[2], f"{self.path}: params.{p.key}")
        self._check_training(base)
        epochs, grace = self.largest("optim.epochs", base), self.search["grace_period"]
        if grace > epochs:
            raise ConfigError(
                f"{self.path}: search.grace_period={grace} is more than the most epochs a trial trains "
                f"(optim.epochs, at most {epochs}); ASHA first compares trials at epoch grace_period: "
                "lower search.grace_period or raise optim.epochs"
            )

    def _check_training(self, base: dict[str, Any]) -> None:
        """The training checks every trial runs at its start (``check_train_config``), before any
        trial: on the settings all trials share, then on each probed value among them. Every trial
        sets the unconditional parameters, so the shared settings take their first value (the
        base's value of a searched key never trains, and --set may not change it)."""
        from xmodal.train.checks import check_train_config

        first = {p.key: p.probe_values()[0] for p in self.params if not p.when}
        try:
            check_train_config(self.config(base, first))
        except ConfigError as e:
            # a searched value the message names is the one to change; else the base config is
            key = next((k for k in first if k in str(e)), None)
            raise self._training_error(e, key, first.get(key)) from None
        for p in self.params:
            for v in p.probe_values():
                try:
                    # as in a trial: a parameter is only set where its `when:` holds
                    cond = {k: allowed[0] for k, allowed in p.when.items()}
                    check_train_config(self.config(base, {**first, **cond, p.key: v}))
                except ConfigError as e:
                    raise self._training_error(e, p.key, v) from None

    def _training_error(self, e: ConfigError, key: str | None, value: Any) -> ConfigError:
        if key is None:
            return ConfigError(
                f"{self.path}: the base config (base:, fixed:, --set, --gpus-per-trial) fails the "
                f"training checks every trial runs: {e}"
            )
        return ConfigError(f"{self.path}: params.{key}: a trial given {value!r} would fail: {e}")

    def largest(self, key: str, base: dict[str, Any]) -> Any:
        """The largest value ``key`` takes in any trial: the most its parameter can sample (and the
        base's value too, where a ``when:`` leaves the parameter unsampled), else the base's value."""
        for p in self.params:
            if p.key == key:
                return max([*p.probe_values(), _get_path(base, key)] if p.when else p.probe_values())
        return _get_path(base, key)

    def _possible(self, key: str, base: dict[str, Any]) -> tuple[Any, ...]:
        for p in self.params:
            if p.key == key:
                return p.choices if p.kind == "choice" else ()
        return (_get_path(base, key),)


def _get_path(data: dict[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        node = node[part]
    return node


def _has_path(data: dict[str, Any], key: str) -> bool:
    try:
        _get_path(data, key)
        return True
    except (KeyError, TypeError):
        return False


def check_key(key: str, where: str) -> None:
    """``key`` must name a value of the Config (any key below a free-form ``*kwargs`` mapping is allowed)."""
    tp: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(tp):
            if typing.get_origin(tp) is dict:
                return
            raise ConfigError(
                f"{where}: '{'.'.join(parts[:i])}' is a value, not a section; '{key}' cannot be set"
            )
        fields = {f.name: f for f in dataclasses.fields(tp)}
        if part not in fields:
            prefix = ".".join(parts[:i]) or "the config"
            raise ConfigError(
                f"{where}: unknown config key '{key}' ('{part}' is not in {prefix}; "
                f"valid: {', '.join(sorted(fields))})"
            )
        tp = typing.get_type_hints(tp)[part]
    if dataclasses.is_dataclass(tp):
        raise ConfigError(
            f"{where}: '{key}' is a config section; name a value inside it, e.g. "
            f"'{key}.{dataclasses.fields(tp)[0].name}'"
        )


def _check_name(key: str, name: Any, path: Path) -> None:
    from xmodal.models.registries import check_name

    try:
        check_name(key, name)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _check_profile_kwarg(encoder: str, arg: str, where: str) -> None:
    from xmodal.models.registries import check_profile_kwarg

    try:
        check_profile_kwarg(encoder, arg, where)
    except ConfigError as e:
        raise ConfigError(f"{e}; add `when: {{model.profile_encoder: ...}}` to limit it") from None


def parse_param(key: str, spec: Any, earlier: dict[str, Param], where: str) -> Param:
    where = f"{where}: params.{key}"
    check_key(key, where)
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{where}: expected a mapping like {{choice: [a, b]}} or {{uniform: [0.1, 1.0]}}, got {spec!r}"
        )
    unknown = sorted(set(spec) - PARAM_KEYS)
    kinds = [k for k in DISTRIBUTIONS if k in spec]
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {unknown}; distributions: {', '.join(DISTRIBUTIONS)}; "
            "options: step, when"
        )
    if len(kinds) != 1:
        raise ConfigError(
            f"{where}: give exactly one distribution of {', '.join(DISTRIBUTIONS)}; got {kinds or 'none'}"
        )
    kind, arg = kinds[0], spec[kinds[0]]
    when = _parse_when(spec.get("when") or {}, earlier, where)
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"{where}: choice needs a non-empty list of values, got {arg!r}")
        if "step" in spec:
            raise ConfigError(f"{where}: step applies to uniform and int, not choice")
        return Param(key, kind, choices=tuple(arg), when=when)
    if not isinstance(arg, list) or len(arg) != 2:
        raise ConfigError(f"{where}: {kind} needs [low, high], got {arg!r}")
    low, high = (number(v, f"{where}.{kind}") for v in arg)
    if low > high:
        raise ConfigError(f"{where}: {kind} low {low:g} > high {high:g}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {low:g}")
    if kind == "int" and (low != int(low) or high != int(high)):
        raise ConfigError(f"{where}: int bounds must be whole numbers, got [{low:g}, {high:g}]")
    step = None
    if "step" in spec:
        if kind == "loguniform":
            raise ConfigError(f"{where}: step applies to uniform and int, not loguniform")
        step = number(spec["step"], f"{where}.step")
        if step <= 0 or (kind == "int" and step != int(step)):
            raise ConfigError(
                f"{where}: step must be a positive {'whole ' if kind == 'int' else ''}number, "
                f"got {spec['step']!r}"
            )
    return Param(key, kind, low=low, high=high, step=step, when=when)


def _parse_when(when: Any, earlier: dict[str, Param], where: str) -> dict[str, tuple[Any, ...]]:
    if not isinstance(when, dict):
        raise ConfigError(f"{where}.when: expected a mapping {{param: value or [values]}}, got {when!r}")
    out: dict[str, tuple[Any, ...]] = {}
    for k, v in when.items():
        cond = earlier.get(k)
        if cond is None or cond.kind != "choice":
            raise ConfigError(
                f"{where}.when: '{k}' must be a choice parameter declared above this one "
                f"(declared so far: {', '.join(earlier) or 'none'})"
            )
        allowed = tuple(v) if isinstance(v, list) else (v,)
        bad = [a for a in allowed if a not in cond.choices]
        if bad:
            raise ConfigError(f"{where}.when: {k} can never be {bad}; its choices are {list(cond.choices)}")
        out[k] = allowed
    return out


def parse_space(data: Any, path: Path, text: str = "") -> Space:
    """A Space from the parsed YAML ``data`` of ``path``; structural errors name the key."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a space file is a mapping with params: (and optional fixed:, base:, trials:, search:)"
        )
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {unknown}; valid: {', '.join(sorted(TOP_KEYS))}")
    params_spec = data.get("params")
    if not isinstance(params_spec, dict) or not params_spec:
        raise ConfigError(f"{path}: params: must map at least one dotted config key to a distribution")
    params: dict[str, Param] = {}
    for key, spec in params_spec.items():
        params[key] = parse_param(str(key), spec, dict(params), str(path))
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{path}: fixed: must map dotted config keys to values")
    for key in fixed:
        check_key(str(key), f"{path}: fixed.{key}")
        if key in params:
            raise ConfigError(f"{path}: '{key}' is both fixed and searched; keep one")
    trials = data.get("trials", 10)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise ConfigError(f"{path}: trials: must be a positive whole number, got {trials!r}")
    search = data.get("search") or {}
    bad = sorted(set(search) - set(SEARCH_DEFAULTS)) if isinstance(search, dict) else ["(not a mapping)"]
    if bad:
        raise ConfigError(f"{path}: search: unknown key(s) {bad}; valid: {', '.join(SEARCH_DEFAULTS)}")
    search = {**SEARCH_DEFAULTS, **search}
    for k, v in search.items():
        low = 0 if k in ("seed", "startup_trials") else (2 if k == "reduction_factor" else 1)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ConfigError(f"{path}: search.{k} must be a whole number >= {low}, got {v!r}")
    base = data.get("base")
    base_path = (path.parent / base).resolve() if base else None
    return Space(path, text, list(params.values()), dict(fixed), trials, search, base_path)


def load_space(path: str | Path) -> Space:
    """Parse and structurally validate a space file (``Space.validate`` adds the config checks)."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"search space file not found: {p} (see tune_spaces/ for examples)") from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    return parse_space(data, p, text)
