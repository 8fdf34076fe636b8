"""Measurements as declarative tasks, so they can run anywhere the model and its quantized weights are.

A task names a token set and either a config (layer -> format name) or one layer with Gaussian
noise at a relative MSE and a seed; its result is a `Measurement` against the FP model on that
token set. Token-set names are `calibration`, `evaluation`, or `NAME:K` for the first K tokens of
NAME (whole sequences, or one sequence cut to K). Tasks carry no tensors, so sending one costs
microseconds, and a task's key identifies its result for caching and checkpoints.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Protocol

import numpy as np
import torch

from .evaluate import Evaluator
from .formats import Format
from .quantizers.store import Levels
from .model import LoadedModel
from .types import Measurement


@dataclass(frozen=True)
class EvalTask:
    tokens: str
    assignment: tuple[tuple[str, str], ...] = ()
    noise: tuple[str, float, int] | None = None

    @classmethod
    def config(cls, assignment: Mapping[str, Format], tokens: str) -> "EvalTask":
        return cls(tokens, tuple(sorted((name, fmt.name) for name, fmt in assignment.items())))

    def key(self) -> str:
        body = json.dumps([self.tokens, self.assignment, self.noise])
        return hashlib.sha256(body.encode()).hexdigest()[:32]


def token_subset(tokens: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """Whole sequences up to max_tokens, or the first sequence cut to max_tokens if it is longer."""
    seq_len = tokens.shape[1]
    if seq_len >= max_tokens:
        return tokens[:1, :max_tokens]
    return tokens[: max(1, max_tokens // seq_len)]


def noisy_weight(weight: torch.Tensor, rel_mse: float, seed: int) -> torch.Tensor:
    """W + ε·‖W‖·√(t/numel), ε ~ N(0, 1) from a generator seeded by `seed`: E‖noise‖² = t·‖W‖²."""
    gen = torch.Generator().manual_seed(seed)
    w = weight.detach().float()
    scale = float(w.pow(2).sum()) ** 0.5 * float(np.sqrt(rel_mse / w.numel()))
    noise = torch.randn(w.shape, generator=gen)  # drawn on the CPU: the same numbers on every device
    return (w + noise.to(w.device) * scale).to(weight.dtype)


OnResult = Callable[[int, Measurement], None]


class Backend(Protocol):
    def map(self, tasks: list[EvalTask], progress: Callable[[int], None] | None = None,
            on_result: OnResult | None = None) -> list[Measurement]:
        """Results in the order of `tasks`, whatever order they finish in; `on_result(index, result)`
        is called as each arrives."""


class TaskRunner:
    """A backend that runs tasks one by one in this process (`run`, one task's measurement)."""

    def run(self, task: EvalTask) -> Measurement:
        raise NotImplementedError

    def map(self, tasks: Iterable[EvalTask], progress: Callable[[int], None] | None = None,
            on_result: OnResult | None = None) -> list[Measurement]:
        out = []
        for index, task in enumerate(tasks):
            out.append(self.run(task))
            if on_result:
                on_result(index, out[-1])
            if progress:
                progress(1)
        return out


class LocalRunner(TaskRunner):
    """Runs tasks in this process: one Evaluator (and FP reference) per token set, built on first use."""

    def __init__(self, model: LoadedModel, levels: Levels, token_sets: Mapping[str, torch.Tensor],
                 batch_size: int = 2, reference: str = "float32"):
        self.model = model
        self.levels = levels
        self.token_sets = dict(token_sets)
        self.batch_size = batch_size
        self.reference = reference
        self._evaluators: dict[str, Evaluator] = {}

    def evaluator(self, name: str) -> Evaluator:
        if name not in self._evaluators:
            base, _, limit = name.partition(":")
            tokens = self.token_sets[base]
            self._evaluators[name] = Evaluator(self.model, self.levels, token_subset(tokens, int(limit)) if limit else tokens,
                                               self.batch_size, self.reference)
        return self._evaluators[name]

    def run(self, task: EvalTask) -> Measurement:
        evaluator = self.evaluator(task.tokens)
        if task.noise is not None:
            layer, rel_mse, seed = task.noise
            spec = self.levels.layers[layer]
            noisy = noisy_weight(self.model.weight(spec), rel_mse, seed)
            return evaluator.evaluate_tensors({layer: self.model.stored(spec, noisy)})
        return evaluator.evaluate({name: self.levels.format_named(fmt) for name, fmt in task.assignment})


class CandidateEvaluator:
    """Loss (KL for LMs) of candidate configs on calibration tokens at two fidelities, for solvers that measure:
    "screen" on the first `screen_tokens` tokens, "full" on all of them. A plain function of
    (configs, fidelity) over the job's backend (the solvers' `Evaluate`)."""

    def __init__(self, backend: Backend, screen_tokens: int):
        self.backend = backend
        self.tokens = {"screen": f"calibration:{screen_tokens}", "full": "calibration"}

    def __call__(self, configs, fidelity: str) -> list[float]:
        tasks = [EvalTask.config(c.assignment(), self.tokens[fidelity]) for c in configs]
        return [m.loss for m in self.backend.map(tasks)]
