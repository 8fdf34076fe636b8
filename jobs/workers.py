"""Evaluation workers: Ray actors that run measurement tasks.

Each actor receives the model through the object store once — torch tensors mapped zero-copy
(RAY_ENABLE_ZERO_COPY_TORCH_TENSORS), so N workers share one copy. Ray maps plain tensors only, not
nn.Parameter, so the module travels without its weights and its state dict travels as plain tensors that
the worker puts back in place. Quantized weights do not travel: each actor opens the job's level store
(the same files, pages shared through the OS) with its own bounded working set. Each actor then builds
its FP references per token set on first use, and evaluates `EvalTask`s. An ActorPool balances the
tasks; results come back in task order whatever order they finish in. An actor that dies is
restarted by Ray and its in-flight task re-run (max_restarts / max_task_retries), so losing a
worker costs time, not results. GPU workers take `num_gpus` (fractional allowed) when the job asks.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable

from . import cluster  # noqa: F401  (sets Ray's zero-copy switch before Ray is imported)

import ray  # noqa: E402
import torch
from ray.util import ActorPool

from bitalloc.errors import Interrupted, deferred_signals
from bitalloc.formats import Format
from bitalloc.model import NEXT_TOKEN, QuantizableLayer, from_module
from bitalloc.quantizers.store import LevelStore, Levels
from bitalloc.tasks import EvalTask, LocalRunner, OnResult
from bitalloc.types import Measurement


@ray.remote(max_restarts=4, max_task_retries=4)
class EvalWorker:
    def __init__(self, skeleton, state: dict[str, torch.Tensor], layers: list[QuantizableLayer],
                 formats: tuple[Format, ...], stores: dict[str, LevelStore], working_set: int | None,
                 token_sets: dict[str, torch.Tensor], batch_size: int, threads: int, metric: str, reference: str,
                 evaluator: str = "torch"):
        torch.set_num_threads(threads)
        module = _restore(skeleton, state)
        gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        if gpu:
            module = module.to("cuda")
            token_sets = {name: t.to("cuda") for name, t in token_sets.items()}
        model = from_module(module, "worker", metric=metric)
        for store in stores.values():  # a no-op beside the driver; on another node, makes the same levels there
            store.fill(model, layers, formats)
        # on a GPU, every level is held packed on the device and candidates run on the Triton kernels
        levels = Levels(model, layers, formats, stores, working_set, device="cuda" if gpu else None)
        if evaluator == "llamacpp":  # llama.cpp's forward on this worker's CPUs
            from bitalloc.runtimes.llamacpp.evaluator import LlamaCppRunner

            self.runner = LlamaCppRunner(model, levels, token_sets, batch_size, threads)
        else:
            self.runner = LocalRunner(model, levels, token_sets, batch_size, reference)

    def run(self, item: tuple[int, EvalTask]) -> tuple[int, Measurement]:
        index, task = item
        return index, self.runner.run(task)

    def pid(self) -> int:
        return os.getpid()


@contextmanager
def _without_weights(module: torch.nn.Module):
    """The module with every parameter and buffer emptied (restored on exit), for pickling its structure alone."""
    saved = [(p, p.data) for p in module.parameters()]
    buffers = [(m, name, b) for m in module.modules() for name, b in m._buffers.items() if b is not None]
    try:
        for p, _ in saved:
            p.data = torch.empty(0, dtype=p.dtype)
        for m, name, b in buffers:
            m._buffers[name] = torch.empty(0, dtype=b.dtype)
        yield module
    finally:
        for p, data in saved:
            p.data = data
        for m, name, b in buffers:
            m._buffers[name] = b


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent ones too) as plain, detached tensors."""
    named = dict(module.named_parameters(remove_duplicate=False))
    named.update(dict(module.named_buffers(remove_duplicate=False)))
    return {name: t.detach() for name, t in named.items()}


def _restore(skeleton: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    for name, tensor in state.items():
        owner, _, attr = name.rpartition(".")
        module = skeleton.get_submodule(owner)
        if attr in module._parameters:
            module._parameters[attr].data = tensor
        else:
            module._buffers[attr] = tensor
    return skeleton


POLL_S = 0.2  # how often a wait for workers' results looks for Ctrl-C


class RayRunner:
    """A backend whose tasks run on `workers` Ray actors."""

    def __init__(self, module, levels: Levels, token_sets, batch_size: int, workers: int,
                 threads_per_worker: int = 1, gpus_per_worker: float = 0.0, metric: str = NEXT_TOKEN,
                 reference: str = "float32", evaluator: str = "torch"):
        with _without_weights(module):
            skeleton = ray.put(module)
        # held for the runner's life: a restarted actor fetches its constructor arguments again
        self._shared = (skeleton, ray.put(_state(module)))
        options = {"num_cpus": threads_per_worker, "num_gpus": gpus_per_worker}
        self.actors = [EvalWorker.options(**options).remote(*self._shared, list(levels.layers.values()),
                                                            levels.formats, levels.stores, levels.working_set,
                                                            token_sets, batch_size, threads_per_worker, metric,
                                                            reference, evaluator)
                       for _ in range(workers)]
        self.pool = ActorPool(self.actors)

    def map(self, tasks: list[EvalTask], progress: Callable[[int], None] | None = None,
            on_result: OnResult | None = None) -> list[Measurement]:
        results: list[Measurement | None] = [None] * len(tasks)
        with deferred_signals() as stopped:  # Ctrl-C is polled between waits, never raised inside Ray's
            for item in enumerate(tasks):
                self.pool.submit(lambda actor, item: actor.run.remote(item), item)
            while self.pool.has_next():
                try:
                    index, measurement = self.pool.get_next_unordered(timeout=POLL_S)
                except TimeoutError:
                    index = None
                if stopped:
                    raise Interrupted(stopped[0])
                if index is None:
                    continue
                results[index] = measurement
                if on_result:
                    on_result(index, measurement)
                if progress:
                    progress(1)
        return results

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
