"""Model registry in the style of timm: named paper configurations built by name.

Each named model is a small function that fills in its constructor arguments::

    @register_model("256-M-4-H")
    def mlp_256_m_4_h(*, seed=None, **overrides):
        return build_model(EnsembleMLP, dict(num_members=256, hidden=4), seed, overrides)

``create_model("256-M-4-H", seed=0, num_classes=3)`` then builds it with any constructor
argument overridden.
"""

import fnmatch
import functools
import inspect
import json
import re
from collections.abc import Callable
from typing import Any, TypeVar

from modloss.models._base import EnsembleModel

__all__ = ["build_model", "create_model", "list_models", "register_model"]

ModelFn = TypeVar("ModelFn", bound=Callable[..., EnsembleModel])
Model = TypeVar("Model", bound=EnsembleModel)

_MODELS: dict[str, Callable[..., EnsembleModel]] = {}


def register_model(name: str) -> Callable[[ModelFn], ModelFn]:
    """Decorator: register ``fn(*, seed=None, **overrides) -> model`` under ``name``."""

    def decorator(fn: ModelFn) -> ModelFn:
        if name in _MODELS:
            raise ValueError(f"model name {name!r} is already registered")
        _MODELS[name] = fn
        return fn

    return decorator


def _natural_key(name: str) -> list[str | int]:
    # Digit runs compare as numbers: 16-M-64-H before 256-M-4-H, DN-64 before DN-100.
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching the shell-style ``pattern`` (case-sensitive), in natural
    order (numbers compare by value)."""
    return sorted((n for n in _MODELS if fnmatch.fnmatchcase(n, pattern)), key=_natural_key)


def create_model(name: str, *, seed: int | None = None, **overrides: Any) -> EnsembleModel:
    """Build the registered model ``name``, initialised from ``seed``; ``overrides``
    replace any of its constructor arguments (e.g. ``num_classes``)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(_MODELS)}")
    return _MODELS[name](seed=seed, **overrides)


def num_members(name: str, **overrides: Any) -> int:
    """The ensemble size of the registered model ``name`` with ``overrides`` (built once per
    name and overrides, then remembered)."""
    return _num_members(name, json.dumps(overrides, sort_keys=True))


@functools.cache
def _num_members(name: str, overrides: str) -> int:
    return create_model(name, seed=0, **json.loads(overrides)).num_members


def build_model(
    cls: type[Model],
    defaults: dict[str, Any],
    seed: int | None,
    overrides: dict[str, Any],
) -> Model:
    """``cls(**(defaults | overrides), seed=seed)``, refusing overrides that are not
    constructor arguments of ``cls``."""
    allowed = [p for p in inspect.signature(cls).parameters if p != "seed"]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown override(s) {unknown} for {cls.__name__}; allowed: {', '.join(allowed)}"
        )
    return cls(**{**defaults, **overrides}, seed=seed)
