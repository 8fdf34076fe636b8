"""Pareto fronts of (bytes, quality) and picking points on them."""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


def nondominated(items: Sequence[T], size: Callable[[T], float] = lambda c: c.bytes,
                 loss: Callable[[T], float] = lambda c: c.predicted) -> list[T]:
    """Items no other item beats on both size and loss, sorted by size; ties keep the first."""
    out: list[T] = []
    for item in sorted(items, key=lambda c: (size(c), loss(c))):
        if not out or loss(item) < loss(out[-1]):
            out.append(item)
    return out


def best_within(front: Sequence[T], max_bytes: int, size: Callable[[T], float] = lambda c: c.bytes) -> T | None:
    """On a front sorted by size, the largest (hence best) item that fits; None if none does."""
    fitting = [c for c in front if size(c) <= max_bytes]
    return fitting[-1] if fitting else None


def spread(front: Sequence[T], k: int, size: Callable[[T], float] = lambda c: c.bytes) -> list[T]:
    """k items at evenly spaced interior sizes between the front's ends (fewer if they coincide)."""
    if not front or k <= 0:
        return []
    lo, hi = size(front[0]), size(front[-1])
    picked: list[T] = []
    for i in range(1, k + 1):
        item = best_within(front, lo + (hi - lo) * i / (k + 1), size)
        if item is not None and all(item is not p for p in picked):
            picked.append(item)
    return picked
