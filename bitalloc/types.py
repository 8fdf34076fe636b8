"""The typed objects handed from stage to stage:
model -> SensitivityTable -> Problem -> solver -> SolveResult (BitConfigs) -> Measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .errors import BitallocError
from .formats import Format
from .units import bytes_at_avg_bits


@dataclass(frozen=True)
class FileBytes:
    """How a runtime's file stores a point, so that a front's bytes are the file's: `fixed` bytes whatever the
    formats (metadata, tokenizer, tensor index, the tensors no unit is), and each unit's tensor padded to
    `alignment`. `runtime` names whose file (or folder)."""

    runtime: str
    fixed: int
    alignment: int = 1
    kind: str = "file"  # or "folder": a checkpoint folder's files together

    def stored(self, n_bytes: int) -> int:
        return -(-n_bytes // self.alignment) * self.alignment


@dataclass
class SensitivityTable:
    """layer x format -> predicted increase of the job's loss, with where the numbers came from."""

    layers: tuple[str, ...]
    formats: tuple[Format, ...]
    values: np.ndarray
    estimator: str
    params: dict = field(default_factory=dict)
    version: int = 1
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


class Limit:
    """A resource each (layer, format) uses some of, and the most a config may use in total (BOPs, latency, ...).

    A new constraint is one subclass: its `usage` table (layers x formats), its `limit`, the spec field that sets
    it, and how its values become integers for the ILP (rounded up, so a config within the integer limit is within
    the real one)."""

    name: str = "resource"
    field: str = "search"
    unit: str = ""
    scale: float = 1.0  # integer units per unit of usage, for the ILP

    def __init__(self, usage: np.ndarray, limit: float):
        self.usage = np.asarray(usage)
        self.limit = limit

    def integer_usage(self, usage: np.ndarray) -> np.ndarray:
        """Rounded up (after dropping float noise far below one unit, e.g. 1e-5 s x 1e9 = 10000.000000000002 ns)."""
        return np.ceil(np.round(np.asarray(usage, dtype=np.float64) * self.scale, 6)).astype(np.int64)

    def integer_limit(self) -> int:
        return int(np.floor(self.limit * self.scale))

    def describe(self, least: int, most: int) -> str:
        """The refusal when `limit` is below the least reachable (least and most in integer units)."""
        unit = f" {self.unit}" if self.unit else ""
        return (f"{self.limit:.6g}{unit} is below the least reachable under the other constraints; feasible range "
                f"{least / self.scale:.6g}..{most / self.scale:.6g}{unit}")


@dataclass(frozen=True)
class Problem:
    """A multiple-choice knapsack: pick one allowed format per layer, minimise the summed error.

    The instance only; the byte budget is the question asked of it (`solver.solve(problem, max_bytes)`), so one
    problem serves every budget. `allowed` carries pinned layers and min/max bits; `groups` lists layers that
    must share one format (q/k/v, gate/up, so that fused kernels stay possible); `limits` are the other resource
    limits (BOPs, latency). `fixed_bytes` is everything the solver does not choose (other parameters, buffers,
    layers left out), so totals are whole-model bytes: bitalloc's count (every tensor at its format or dtype), or
    the bytes of the file a runtime writes (`file`).
    """

    layers: tuple[str, ...]
    formats: tuple[Format, ...]
    numel: np.ndarray
    cost: np.ndarray
    error: np.ndarray
    allowed: np.ndarray
    fixed_bytes: int
    groups: tuple[tuple[int, ...], ...] = ()
    limits: tuple[Limit, ...] = ()
    substitute: np.ndarray | None = None  # [layer, format]: the format a uniform config stores where one does not fit
    file: FileBytes | None = None  # the runtime file whose bytes these are; None: bitalloc's count

    def __post_init__(self) -> None:
        for name in ("numel", "cost", "error", "allowed", "substitute"):
            if getattr(self, name) is None:
                continue  # read-only copies: one problem answers every budget
            array = np.array(getattr(self, name))
            array.setflags(write=False)
            object.__setattr__(self, name, array)
        items = self.items()
        empty = np.flatnonzero(~items.allowed.any(1))
        if len(empty):
            names = [self.layers[i] for i in items.members[empty[0]]]
            raise BitallocError("search.pin", f"no format is allowed for {', '.join(names)} (pins, min/max bits and ties conflict)")

    def with_error(self, table: SensitivityTable) -> "Problem":
        """The same instance with the table's predicted errors (the table must be of its layers and formats)."""
        if tuple(table.layers) != self.layers or tuple(table.formats) != self.formats:
            raise ValueError("the sensitivity table is not of this problem's layers and formats")
        return replace(self, error=table.values)

    def items(self) -> "Items":
        """The units a solver chooses for: each tied group as one item (summed costs, shared allowed set), each other layer alone."""
        grouped = {i for g in self.groups for i in g}
        members = [tuple(g) for g in self.groups] + [(i,) for i in range(len(self.layers)) if i not in grouped]

        def merge(table, reduce=np.sum):
            return np.stack([reduce(table[list(m)], axis=0) for m in members])

        return Items(
            members=members,
            cost=merge(self.cost),
            error=merge(self.error),
            allowed=merge(self.allowed, np.all),
            usage=tuple(merge(limit.usage) for limit in self.limits),
            n_layers=len(self.layers),
        )

    def total_bytes(self, choice: np.ndarray) -> int:
        return int(self.fixed_bytes + self.cost[np.arange(len(self.layers)), choice].sum())

    def avg_bits(self, choice: np.ndarray) -> float:
        return self.avg_bits_of_bytes(self.total_bytes(choice))

    def avg_bits_of_bytes(self, total_bytes: int) -> float:
        return 8.0 * (total_bytes - self.fixed_bytes) / float(self.numel.sum())

    def bytes_at_avg_bits(self, avg_bits: float) -> int:
        return bytes_at_avg_bits(avg_bits, int(self.numel.sum()), self.fixed_bytes)

    def cheapest(self) -> int:
        items = self.items()
        return int(self.fixed_bytes + np.where(items.allowed, items.cost, np.iinfo(np.int64).max).min(1).sum())

    def dearest(self) -> int:
        items = self.items()
        return int(self.fixed_bytes + np.where(items.allowed, items.cost, 0).max(1).sum())

    def feasible(self, choice: np.ndarray, max_bytes: int | None = None) -> bool:
        """Allowed formats, shared formats in every group, every limit met and, when given, the byte budget."""
        rows = np.arange(len(self.layers))
        if not self.allowed[rows, choice].all() or any(len(set(choice[list(g)])) > 1 for g in self.groups):
            return False
        if max_bytes is not None and self.total_bytes(choice) > max_bytes:
            return False
        return all(limit.usage[rows, choice].sum() <= limit.limit for limit in self.limits)

    def choice(self, config: "BitConfig") -> np.ndarray:
        """The per-layer format indices of a config of this problem."""
        return np.array([self.formats.index(f) for f in config.formats], dtype=np.int64)

    def config(self, choice) -> "BitConfig":
        choice = np.asarray(choice, dtype=np.int64)
        if not self.allowed[np.arange(len(self.layers)), choice].all():
            raise ValueError("choice uses a format that is not allowed for its layer")
        return self._config(choice)

    def uniform(self, j: int) -> "BitConfig":
        """Every layer at format j, pins and ties aside (where j does not fit a layer, what the runtime stores
        instead: `substitute`): the baseline a mixed config is compared with."""
        choice = np.full(len(self.layers), j, dtype=np.int64)
        if self.substitute is not None:
            choice = self.substitute[:, j].copy()
        return self._config(choice)

    def _config(self, choice: np.ndarray) -> "BitConfig":
        return BitConfig(
            layers=self.layers,
            formats=tuple(self.formats[i] for i in choice),
            bytes=self.total_bytes(choice),
            avg_bits=self.avg_bits(choice),
            predicted=float(self.error[np.arange(len(self.layers)), choice].sum()),
        )


@dataclass(frozen=True)
class Items:
    """A problem seen by its solver units: `members[k]` are the layer indices item k sets at once; `usage[r]` is
    limit r's usage per (item, format)."""

    members: list[tuple[int, ...]]
    cost: np.ndarray
    error: np.ndarray
    allowed: np.ndarray
    usage: tuple[np.ndarray, ...]
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
    loss_error: float = 0.0  # a bound on |loss − the loss against an exact reference| (0: the reference is exact)


@dataclass(frozen=True)
class SolveResult:
    """What a solver found: configs sorted by bytes (one for `solve`, the non-dominated front for `front`), and how.

    `bound`: how far the predicted error of a config may be from the true optimum at its budget (0: exact;
    the ILP's integer scaling); `slack_bytes`: the DP's rounding (a config is no worse than the exact optimum at
    budget − slack); `evaluations`: candidates a measuring solver measured, by fidelity."""

    solver: str
    configs: tuple[BitConfig, ...]
    bound: float = 0.0
    slack_bytes: int = 0
    evaluations: dict[str, int] = field(default_factory=lambda: {"screen": 0, "full": 0})
    wall_time_s: float = 0.0

    @property
    def config(self) -> BitConfig:
        """The answer of `solve`: the one config (the largest, for a front)."""
        return self.configs[-1]
