"""Evaluation workers: Ray actors that run measurement tasks.

Each actor receives the model and the quantized-weight cache through the object store once — torch
tensors mapped zero-copy (RAY_ENABLE_ZERO_COPY_TORCH_TENSORS), so N workers share one copy — builds
its FP references per token set on first use, and evaluates `EvalTask`s. An ActorPool balances the
tasks; results come back in task order whatever order they finish in. An actor that dies is
restarted by Ray and its in-flight task re-run (max_restarts / max_task_retries), so losing a
worker costs time, not results. GPU workers take `num_gpus` (fractional allowed) when the job asks.
"""

from __future__ import annotations

import os
from typing import Callable

import ray
import torch
from ray.util import ActorPool

from bitalloc.evaluate import QuantCache
from bitalloc.formats import Format
from bitalloc.model import QuantizableLayer, from_module
from bitalloc.tasks import EvalTask, LocalRunner, OnResult
from bitalloc.types import Measurement


@ray.remote(max_restarts=4, max_task_retries=4)
class EvalWorker:
    def __init__(self, module, layers: list[QuantizableLayer], formats: tuple[Format, ...], store: dict,
                 token_sets: dict[str, torch.Tensor], batch_size: int, threads: int):
        torch.set_num_threads(threads)
        if ray.get_gpu_ids() and torch.cuda.is_available():
            module = module.to("cuda")
            store = {key: t.to("cuda") for key, t in store.items()}
            token_sets = {name: t.to("cuda") for name, t in token_sets.items()}
        model = from_module(module, "worker")
        self.runner = LocalRunner(model, QuantCache(model, layers, formats, store=store), token_sets, batch_size)

    def run(self, item: tuple[int, EvalTask]) -> tuple[int, Measurement]:
        index, task = item
        return index, self.runner.run(task)

    def pid(self) -> int:
        return os.getpid()


class RayRunner:
    """A backend whose tasks run on `workers` Ray actors."""

    def __init__(self, module, layers, formats, store, token_sets, batch_size: int, workers: int,
                 threads_per_worker: int = 1, gpus_per_worker: float = 0.0):
        shared = ray.put(module), ray.put(store)
        options = {"num_cpus": threads_per_worker, "num_gpus": gpus_per_worker}
        self.actors = [EvalWorker.options(**options).remote(shared[0], layers, formats, shared[1], token_sets,
                                                            batch_size, threads_per_worker) for _ in range(workers)]
        self.pool = ActorPool(self.actors)

    def map(self, tasks: list[EvalTask], progress: Callable[[int], None] | None = None,
            on_result: OnResult | None = None) -> list[Measurement]:
        results: list[Measurement | None] = [None] * len(tasks)
        for index, measurement in self.pool.map_unordered(lambda actor, item: actor.run.remote(item),
                                                          list(enumerate(tasks))):
            results[index] = measurement
            if on_result:
                on_result(index, measurement)
            if progress:
                progress(1)
        return results

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
