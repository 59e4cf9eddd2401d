"""Model registry: named factory functions (timm's ``@register_model`` / open_clip's ``list_models``)."""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from typing import TypeVar

from torch import nn

Factory = TypeVar("Factory", bound=Callable[..., nn.Module])

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Factory], Factory]:
    """Decorator registering ``factory(**overrides) -> nn.Module`` under ``name``.

    Raises ``ValueError`` when ``name`` is already taken.
    """

    def decorator(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is already registered; known models: {list_models()}")
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names, sorted; ``pattern`` filters with shell wildcards (e.g. ``"*hiera*"``)."""
    names = sorted(_REGISTRY)
    return fnmatch.filter(names, pattern) if pattern else names


def create_model(name: str, **overrides) -> nn.Module:
    """Build the registered model ``name``; ``overrides`` replace the factory's defaults.

    Raises ``ValueError`` for an unknown name or an override the factory does not take (listing
    the known names / the accepted overrides).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {list_models()}")
    factory = _REGISTRY[name]
    accepted = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = sorted(set(overrides) - set(accepted)) if not takes_any else []
    if unknown:
        raise ValueError(f"model {name!r} does not take {unknown}; accepted overrides: {sorted(accepted)}")
    return factory(**overrides)
