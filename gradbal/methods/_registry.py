"""Name -> method class registry, so ``method="mokd"`` and ``method=MoKD()`` both work."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ._base import Method

__all__ = ["available_methods", "get_method", "register_method"]

_REGISTRY: dict[str, type[Method]] = {}
M = TypeVar("M", bound=type[Method])


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: make a :class:`Method` subclass available by ``name``."""

    def decorate(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"register_method expects a Method subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a method named {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_methods() -> list[str]:
    """Sorted names accepted by ``method=`` in the optimizer and :func:`gradbal.aggregate`."""
    return sorted(_REGISTRY)


def get_method(spec: str | Method, **options: Any) -> Method:
    """Build a method from its registry name and options, or pass an instance through."""
    if isinstance(spec, Method):
        if options:
            raise TypeError(
                f"method options {sorted(options)} were given with a method object; "
                "pass them to its constructor instead"
            )
        return spec
    if not isinstance(spec, str):
        raise TypeError(
            f"method must be a name or a gradbal.methods.Method, got {type(spec).__name__}"
        )
    try:
        cls = _REGISTRY[spec]
    except KeyError:
        raise ValueError(
            f"unknown method {spec!r}; available: {', '.join(available_methods())}"
        ) from None
    try:
        return cls(**options)
    except TypeError as err:
        raise TypeError(f"bad options for method {spec!r}: {err}") from None
