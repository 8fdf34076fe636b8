"""Components chosen by name in the job spec (estimators, solvers): one registry type for all.

A component's parameters are its constructor's keyword arguments: their names and annotations are
what a spec may set, their defaults what it gets otherwise. A parameter that was renamed stays known
under its old name in the class's `renamed` mapping, so an old spec gets a one-line error naming the new one."""

from __future__ import annotations

import inspect
import typing
from typing import Any, Callable, Generic, TypeVar

from pydantic import TypeAdapter, ValidationError

from .errors import BitallocError

T = TypeVar("T")


def declared_parameters(cls) -> tuple[list[str], dict[str, Any]]:
    """The keyword parameters a component declares and their annotations (a class forwarding **kwargs names the
    class it forwards to in `params_of`)."""
    target = getattr(cls, "params_of", cls)
    names = [name for name, p in inspect.signature(target).parameters.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, typing.get_type_hints(target.__init__)


class Registry(Generic[T]):
    def __init__(self, kind: str, field: str, params_field: str):
        self.kind, self.field, self.params_field = kind, field, params_field
        self.classes: dict[str, Callable[..., T]] = {}

    def register(self, name: str):
        def wrap(cls):
            cls.name = name
            self.classes[name] = cls
            return cls

        return wrap

    def check(self, name: str, params: dict[str, Any]) -> dict[str, Any]:
        """`params` validated against the component's declared parameters (names and types); unknown names and
        parameters are user errors naming the field and what is allowed."""
        if name not in self.classes:
            raise BitallocError(self.field, f"{name!r} is not {self.kind}; allowed: {', '.join(sorted(self.classes))}")
        declared, hints = declared_parameters(self.classes[name])
        out = {}
        for key, value in params.items():
            new = getattr(self.classes[name], "renamed", {}).get(key)
            if new is not None:
                raise BitallocError(f"{self.params_field}.{key}", f"renamed to {new!r} (same meaning)")
            if key not in declared:
                allowed = ", ".join(declared) or "none"
                raise BitallocError(f"{self.params_field}.{key}", f"not a parameter of {name}; allowed: {allowed}")
            try:
                out[key] = TypeAdapter(hints[key]).validate_python(value) if key in hints else value
            except ValidationError as exc:
                err = exc.errors()[0]
                raise BitallocError(f"{self.params_field}.{key}",
                                    f"{err['msg']} for {name} (got {value!r:.60})") from None
        return out

    def create(self, name: str, **params) -> T:
        """An instance with `params`, checked first (see `check`)."""
        params = self.check(name, params)
        return self.classes[name](**params)
