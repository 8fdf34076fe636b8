"""The typed objects handed from stage to stage:
model -> SensitivityTable -> Problem -> solver -> BitConfig -> Measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import BitallocError
from .formats import Format


@dataclass
class SensitivityTable:
    """layer x format -> predicted increase of the job's loss, with where the numbers came from."""

    layers: tuple[str, ...]
    formats: tuple[Format, ...]
    values: np.ndarray
    estimator: str
    params: dict = field(default_factory=dict)
    data_hash: str | None = None
    wall_time_s: float = 0.0
    uncertainty: np.ndarray | None = None
    peak_rss_bytes: int | None = None

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64)
        if self.values.shape != (len(self.layers), len(self.formats)):
            raise ValueError(f"table shape {self.values.shape} != ({len(self.layers)}, {len(self.formats)})")
        if self.uncertainty is not None:
            self.uncertainty = np.asarray(self.uncertainty, dtype=np.float64)
        bad = ~np.isfinite(self.values)
        if bad.any():
            i, j = map(int, np.argwhere(bad)[0])
            raise BitallocError(
                f"sensitivity.{self.estimator}",
                f"non-finite value {self.values[i, j]} for layer {self.layers[i]!r} at {self.formats[j].name}",
            )


@dataclass(frozen=True)
class Problem:
    """A multiple-choice knapsack: pick one allowed format per layer, minimise the summed error.

    Constraints: `max_bytes` (whole model), and optionally `max_bops` (bit operations per token)
    and `max_latency` (seconds, from a measured per-layer table). `allowed` carries pinned layers
    and min/max bits; `groups` lists layers that must share one format (q/k/v, gate/up, so that
    fused kernels stay possible). `fixed_bytes` is everything the solver does not choose (other
    parameters, buffers, layers left out), so totals are whole-model bytes.
    """

    layers: tuple[str, ...]
    formats: tuple[Format, ...]
    numel: np.ndarray
    cost: np.ndarray
    error: np.ndarray
    allowed: np.ndarray
    fixed_bytes: int
    max_bytes: int | None = None
    groups: tuple[tuple[int, ...], ...] = ()
    bops: np.ndarray | None = None
    max_bops: int | None = None
    latency: np.ndarray | None = None
    max_latency: float | None = None

    def __post_init__(self) -> None:
        items = self.items()
        empty = np.flatnonzero(~items.allowed.any(1))
        if len(empty):
            names = [self.layers[i] for i in items.members[empty[0]]]
            raise BitallocError("search.pin", f"no format is allowed for {', '.join(names)} (pins, min/max bits and ties conflict)")

    def items(self) -> "Items":
        """The units a solver chooses for: each tied group as one item (summed costs, shared allowed set), each other layer alone."""
        grouped = {i for g in self.groups for i in g}
        members = [tuple(g) for g in self.groups] + [(i,) for i in range(len(self.layers)) if i not in grouped]

        def merge(table, reduce=np.sum):
            return None if table is None else np.stack([reduce(table[list(m)], axis=0) for m in members])

        return Items(
            members=members,
            cost=merge(self.cost),
            error=merge(self.error),
            allowed=merge(self.allowed, np.all),
            bops=merge(self.bops),
            latency=merge(self.latency),
            n_layers=len(self.layers),
        )

    def total_bytes(self, choice: np.ndarray) -> int:
        return int(self.fixed_bytes + self.cost[np.arange(len(self.layers)), choice].sum())

    def avg_bits(self, choice: np.ndarray) -> float:
        return self.avg_bits_of_bytes(self.total_bytes(choice))

    def avg_bits_of_bytes(self, total_bytes: int) -> float:
        return 8.0 * (total_bytes - self.fixed_bytes) / float(self.numel.sum())

    def bytes_at_avg_bits(self, avg_bits: float) -> int:
        return self.fixed_bytes + int(avg_bits * float(self.numel.sum()) / 8.0)

    def cheapest(self) -> int:
        items = self.items()
        return int(self.fixed_bytes + np.where(items.allowed, items.cost, np.iinfo(np.int64).max).min(1).sum())

    def dearest(self) -> int:
        items = self.items()
        return int(self.fixed_bytes + np.where(items.allowed, items.cost, 0).max(1).sum())

    def feasible(self, choice: np.ndarray) -> bool:
        """Allowed formats, shared formats in every group, and every constraint met."""
        rows = np.arange(len(self.layers))
        if not self.allowed[rows, choice].all() or any(len(set(choice[list(g)])) > 1 for g in self.groups):
            return False
        if self.max_bytes is not None and self.total_bytes(choice) > self.max_bytes:
            return False
        if self.max_bops is not None and self.bops[rows, choice].sum() > self.max_bops:
            return False
        return self.max_latency is None or self.latency[rows, choice].sum() <= self.max_latency

    def choice(self, config: "BitConfig") -> np.ndarray:
        """The per-layer format indices of a config of this problem."""
        return np.array([self.formats.index(f) for f in config.formats], dtype=np.int64)

    def config(self, choice) -> "BitConfig":
        choice = np.asarray(choice, dtype=np.int64)
        if not self.allowed[np.arange(len(self.layers)), choice].all():
            raise ValueError("choice uses a format that is not allowed for its layer")
        return BitConfig(
            layers=self.layers,
            formats=tuple(self.formats[i] for i in choice),
            bytes=self.total_bytes(choice),
            avg_bits=self.avg_bits(choice),
            predicted=float(self.error[np.arange(len(self.layers)), choice].sum()),
        )


@dataclass(frozen=True)
class Items:
    """A problem seen by its solver units: `members[k]` are the layer indices item k sets at once."""

    members: list[tuple[int, ...]]
    cost: np.ndarray
    error: np.ndarray
    allowed: np.ndarray
    bops: np.ndarray | None
    latency: np.ndarray | None
    n_layers: int

    def expand(self, item_choice) -> np.ndarray:
        """Per-layer format indices from per-item ones."""
        choice = np.zeros(self.n_layers, dtype=np.int64)
        for members, f in zip(self.members, item_choice):
            choice[list(members)] = f
        return choice

    def contract(self, choice) -> np.ndarray:
        return np.array([choice[m[0]] for m in self.members], dtype=np.int64)


@dataclass(frozen=True)
class BitConfig:
    """One format per layer and what it costs: whole-model bytes and average bits over the chosen layers, scales included."""

    layers: tuple[str, ...]
    formats: tuple[Format, ...]
    bytes: int
    avg_bits: float
    predicted: float

    def assignment(self) -> dict[str, Format]:
        return dict(zip(self.layers, self.formats))

    def key(self) -> tuple:
        return tuple(f.name for f in self.formats)


@dataclass(frozen=True)
class Measurement:
    """Quality of one config on held-out tokens, against the unquantized model: `loss` and `quality` are the
    model's metric's (`bitalloc.metrics`): KL and perplexity for a causal LM, relative MSE and cosine of the
    final hidden state for an encoder."""

    loss: float
    quality: float
    tokens: int
