"""What a job will hold in memory, planned before the heavy stages, against what the machine has.

Each part is counted from the model's shapes and the job's settings, the way the job holds it:
- the model's own weights at their dtype, counted although loaded: a memory-mapped checkpoint's pages count as
  free until first touched;
- the level store is on disk (its size is checked against the free disk space); a process reads a level's pages
  only while it dequantizes it;
- a working set of dequantized weights in every process that evaluates or estimates: one dense copy of the
  quantized layers in their dtype (one candidate's worth); with the llama.cpp evaluator it bounds the candidate's
  GGUF instead (its mapped pages, and the copies llama.cpp repacks some types into, never more than the float
  file's tensors);
- FP references: evaluation tokens x vocabulary float32 log-probabilities (or x hidden size for a hidden-state
  model) in every process that evaluates, plus the calibration reference where calibration tokens are measured;
- one forward pass's outputs (logits, log-softmax and their product for a batch);
- this process's own footprint (Python, torch, transformers); Ray: the object store's copy of the model, and each
  worker process's own footprint;
- the estimator, as it counts itself (`memory_bytes`): e.g. Fisher one sequence's backward graph and one layer's
  ΔW at a time, HAWQ one double-backward graph and second-order gradients, SQNR with activations the input second
  moments.
A job whose plan does not fit is refused with one line naming the setting to change, instead of being killed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from bitalloc.errors import BitallocError
from bitalloc.evaluate import reference_bytes
from bitalloc.model import LoadedModel, QuantizableLayer
from bitalloc.quantizers.inputs import input_bytes
from bitalloc.quantizers.store import dense_bytes, level_bytes

PROCESS_OVERHEAD = 600 * 2**20  # a process with torch and transformers imported, before it holds anything of the job
HEADROOM = 0.9  # plan to use at most this share of what is available
GiB = 2**30


def available_bytes() -> int:
    """Memory this process may still take: MemAvailable, capped by the cgroup's limit less its usage."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(avail, 0)


def _size(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


@dataclass
class Part:
    name: str
    bytes: int
    setting: str | None  # the spec field that changes it (None: nothing the job sets)


@dataclass
class MemoryPlan:
    parts: list[Part] = field(default_factory=list)
    available: int = 0
    on_disk: int = 0  # the level store's files (read page by page, not held)
    per_process: int = 0  # what each evaluating process holds of it (working set, references, forward pass)

    @property
    def total(self) -> int:
        return sum(p.bytes for p in self.parts)

    def summary(self) -> str:
        shown = ", ".join(f"{p.name} {_size(p.bytes)}" for p in self.parts if p.bytes)
        return (f"memory plan: {shown}; total {_size(self.total)} of {_size(self.available)} available "
                f"({_size(self.per_process)} per evaluating process); levels {_size(self.on_disk)} on disk")

    def check(self) -> None:
        if self.total <= HEADROOM * self.available:
            return
        biggest = max((p for p in self.parts if p.setting), key=lambda p: p.bytes)
        raise BitallocError(biggest.setting, f"the job would hold about {_size(self.total)} and "
                                             f"{_size(self.available)} is available (largest part: "
                                             f"{biggest.name}, {_size(biggest.bytes)}); change this setting "
                                             f"(fewer layers, fewer workers, fewer or shorter sequences, "
                                             f"data.reference: float16, the sqnr estimator) or set "
                                             f"run.memory_limit if more is free")


def expert_swap_bytes(model: LoadedModel, layers: list[QuantizableLayer]) -> int:
    """What a streamed MoE block holds besides its levels while it runs: the FP part of a fused parameter written
    over in place (`LoadedModel.put`), for the largest experts module (part of each forward pass)."""
    per_module: dict[str, int] = {}
    for l in layers:
        if l.experts and (l.rows is not None or l.transposed):
            per_module[l.module_name] = per_module.get(l.module_name, 0) + l.numel * model.parameter(l).element_size()
    return max(per_module.values(), default=0)


def plan(model: LoadedModel, layers: list[QuantizableLayer], formats, spec, estimator,
         workers: int, available: int) -> MemoryPlan:
    """The plan of a job on this model, against `available` bytes measured after it loaded."""
    data = spec.data
    working_set = dense_bytes(model, layers)
    evaluation = reference_bytes(model, data.evaluation * data.seq_len, data.reference)
    calibration = (reference_bytes(model, min(data.calibration * data.seq_len, spec.search.screen_tokens),
                                   data.reference)
                   if spec.search.evaluations or estimator.measures_calibration else 0)
    forward = 3 * reference_bytes(model, data.batch_size * data.seq_len) + expert_swap_bytes(model, layers)
    evaluating = max(workers, 1)  # the Ray workers, or this process
    model_bytes = sum(t.numel() * t.element_size() for t in model.module.state_dict().values())
    parts = [
        Part("this process", PROCESS_OVERHEAD, None),
        Part("model", model_bytes, "model.source"),
        Part("working sets", (evaluating + (1 if workers else 0)) * working_set,
             "run.workers" if workers else "model.exclude"),
        Part("FP references", evaluating * (evaluation + calibration), "data.evaluation"),
        Part("forward passes", evaluating * forward, "data.batch_size"),
        Part("estimator", estimator.memory_bytes(model, layers, data.seq_len), "sensitivity.estimator"),
    ]
    kinds = {q.inputs for q in spec.quantizers().values() if q.inputs}
    if kinds:  # the accumulators live while levels are made, before estimation: counted apart as an upper bound
        kind = "hessian" if "hessian" in kinds else "diagonal"
        parts.append(Part(f"quantizer inputs ({kind})", input_bytes(layers, kind), "formats.method"))
    if workers:
        parts.append(Part("Ray object store (model)", model_bytes, "run.workers"))
        parts.append(Part("Ray worker processes", workers * PROCESS_OVERHEAD, "run.workers"))
    return MemoryPlan(parts, available, level_bytes(layers, formats), working_set + evaluation + calibration + forward)
