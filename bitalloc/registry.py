"""Components chosen by name in the job spec (estimators, solvers): one registry type for all."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from .errors import BitallocError

T = TypeVar("T")


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

    def create(self, name: str, **params) -> T:
        """An instance with `params`; unknown names and parameters are user errors naming the field."""
        if name not in self.classes:
            raise BitallocError(self.field, f"{name!r} is not {self.kind}; allowed: {', '.join(sorted(self.classes))}")
        try:
            return self.classes[name](**params)
        except TypeError as exc:
            raise BitallocError(self.params_field, f"{name}: {exc}") from None
