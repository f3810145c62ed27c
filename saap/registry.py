"""Registries: one per extension axis, each the single source of its names.

An extension (an importance estimator, an allocation strategy, a recovery method,
an export format, a comparison method) is registered where it is defined::

    from saap.importance.estimators import ESTIMATORS

    @ESTIMATORS.register("my_score")
    def my_score(stats, index, generator): ...

``params.yaml`` names are validated against the registry of their axis when a
section is parsed (:func:`registered`), so an unknown name fails with its dotted
path and the list of known names, and no name is repeated in a ``Literal``.

The registry of an axis lives in the module named in :data:`AXES`; validation
imports that module by name only when a value of that axis is checked (the stage
that reads the section imports it anyway), so ``saap.params`` stays light and a
stage's DVC dependencies stay its own code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from saap.errors import ParamsError

T = TypeVar("T")

# axis -> (module holding it, attribute) ; the names of params.yaml keys per axis
AXES: dict[str, tuple[str, str]] = {
    "estimator": ("saap.importance.estimators", "ESTIMATORS"),
    "allocation": ("saap.allocation", "ALLOCATIONS"),
    "recovery": ("saap.recovery", "RECOVERIES"),
    "exporter": ("saap.export", "EXPORTERS"),
    "compare_method": ("saap.methods", "METHODS"),
}


class Registry(Generic[T]):
    """Named entries of one extension axis, in registration order."""

    def __init__(self, axis: str, hint: str = "") -> None:
        self.axis = axis
        self.hint = hint
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding the decorated object under ``name``."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.axis} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def add(self, name: str, entry: T) -> T:
        return self.register(name)(entry)

    def remove(self, name: str) -> T:
        """Take ``name`` out again (an extension loaded for one experiment)."""
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ParamsError(
                f"unknown {self.axis} {name!r}; known: {', '.join(self._entries)}"
                + (f" ({self.hint})" if self.hint else "")
            )
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self):
        return self._entries.items()

    def values(self):
        return self._entries.values()

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def registry(axis: str) -> Registry:
    """The registry of ``axis`` (its module is imported on first use)."""
    module, attribute = AXES[axis]
    return getattr(importlib.import_module(module), attribute)


def names(axis: str, where: Callable[[Any], bool] | None = None) -> list[str]:
    """Registered names of ``axis``, optionally only entries for which ``where``."""
    reg = registry(axis)
    return [n for n, entry in reg.items() if where is None or where(entry)]


def registered(
    axis: str,
    where: Callable[[Any], bool] | None = None,
    what: str = "",
    also: tuple[str, ...] = (),
):
    """A pydantic after-validator: the value (a name or a list of names) must be
    registered on ``axis`` (and satisfy ``where``), or be one of ``also``."""

    def check(value):
        values = value if isinstance(value, list) else [value]
        known = [*also, *names(axis, where)]
        unknown = [v for v in values if v not in known]
        if unknown:
            label = what or axis
            raise ValueError(
                f"unknown {label} {', '.join(map(repr, unknown))}; known: "
                f"{', '.join(known)}"
            )
        return value

    return check
