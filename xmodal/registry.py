"""Name -> factory registries, so YAML configs and tune_spaces name things instead of importing them.

Like timm's ``@register_model``: a module registers its factories at import time, and
``Registry.build(name, **kwargs)`` looks them up. Registries import the modules that fill them
lazily (``modules=``) so that ``xmodal --help`` does not pay for torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


class Registry:
    def __init__(self, kind: str, modules: tuple[str, ...] = ()):
        self.kind = kind
        self._modules = modules
        self._factories: dict[str, Callable[..., Any]] = {}
        self._loaded = False

    def register(self, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            key = name or fn.__name__
            if key in self._factories and self._factories[key] is not fn:
                raise ValueError(f"{self.kind} '{key}' is registered twice ({self._factories[key]} and {fn})")
            self._factories[key] = fn
            return fn

        return deco

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for mod in self._modules:
                importlib.import_module(mod)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._factories)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._factories

    def get(self, name: str) -> Callable[..., Any]:
        self._load()
        try:
            return self._factories[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} '{name}'; registered: {', '.join(self.names())}") from None

    def build(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)
