"""Components chosen by name in the job spec (estimators, solvers, quantizers, runtimes): one registry type for all,
and `discover`, which imports every module of a package so that each component registers itself where it is
defined (a new one is one file).

A component's parameters are the fields of its pydantic `Params` model when it has one (types, ranges, defaults),
else its constructor's keyword arguments: their names and annotations are what a spec may set, their defaults what
it gets otherwise. A parameter that was renamed stays known under its old name in the class's `renamed` mapping, so
an old spec gets a one-line error naming the new one."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing
from typing import Any, Callable, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from .errors import BitallocError

T = TypeVar("T")


class Params(BaseModel):
    """A component's parameters: fields with types, ranges and defaults; unknown names and loose types are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Parameterised:
    """A component whose parameters are the fields of its `Params` model, held as attributes of the same names."""

    Params: ClassVar[type[Params]] = Params

    def __init__(self, **params):
        for name, value in self.Params(**params).model_dump().items():
            setattr(self, name, value)

    def params(self) -> dict:
        """The declared parameters' values, and nothing else an instance may hold."""
        return {name: getattr(self, name) for name in self.Params.model_fields}


def discover(package: str, path, skip: tuple[str, ...] = ()) -> None:
    """Import every module under a package (its `__path__`), subpackages included, but those named in `skip`: each
    registers what it defines."""
    for info in pkgutil.walk_packages(path, prefix=f"{package}."):
        if info.name.rsplit(".", 1)[-1] not in skip:
            importlib.import_module(info.name)


def declared_parameters(cls) -> tuple[list[str], dict[str, Any]]:
    """The keyword parameters a component declares and their annotations (a class forwarding **kwargs names the
    class it forwards to in `params_of`; a class with a `Params` model declares its fields)."""
    model = getattr(cls, "Params", None)
    if model is not None:
        return list(model.model_fields), {k: f.annotation for k, f in model.model_fields.items()}
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
        cls = self.classes[name]
        declared, hints = declared_parameters(cls)
        for key in params:
            new = getattr(cls, "renamed", {}).get(key)
            if new is not None:
                raise BitallocError(f"{self.params_field}.{key}", f"renamed to {new!r} (same meaning)")
            if key not in declared:
                allowed = ", ".join(declared) or "none"
                raise BitallocError(f"{self.params_field}.{key}", f"not a parameter of {name}; allowed: {allowed}")
        if getattr(cls, "Params", None) is not None:
            try:
                checked = cls.Params(**params)
            except ValidationError as exc:
                err = exc.errors()[0]
                if not err["loc"]:  # a rule between parameters
                    raise BitallocError(self.params_field, f"{name}: {err['msg']}") from None
                key = err["loc"][0]
                raise BitallocError(f"{self.params_field}.{key}",
                                    f"{params.get(key)!r:.60} is not allowed for {name}: {err['msg']}") from None
            return {key: getattr(checked, key) for key in params}
        out = {}
        for key, value in params.items():
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
