"""The llama.cpp evaluation backend: candidates measured by llama.cpp's own forward, the arithmetic its users get.

A candidate's GGUF is assembled from the level store (`FileLayout`: the levels are llama.cpp's own blocks, copied, never
quantized again) into a scratch file, memory-mapped by libllama in this process (`library.py`), and run on the task's
windows exactly as `llama-perplexity --kl-divergence` runs them: each window decoded from an empty cache as one batch
(its first token llama.cpp's BOS where its tokenizer adds one), positions n/2 … n−2 scored against the job's float32
reference (the torch model's log-probabilities on the same windows and positions). A candidate costs one write into the
page cache, a mapped load and the forward passes; the file is unlinked once mapped, so a worker killed mid-candidate
leaves nothing behind.

Noise tasks (the `linearity` estimator's) perturb float weights, which a GGUF of levels cannot hold: they run on the
torch evaluator, as sensitivity does.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import closing
from pathlib import Path
from typing import Iterable, Mapping

import torch

from bitalloc.errors import BitallocError, Interrupted, deferred_signals
from bitalloc.evaluate import model_output
from bitalloc.model import HIDDEN_STATE, LoadedModel
from bitalloc.quantizers.gguf.files import float_gguf
from bitalloc.quantizers.gguf.writer import write_file
from bitalloc.quantizers.store import Levels
from bitalloc.tasks import EvalTask, LocalRunner, TaskRunner, token_subset
from bitalloc.types import Measurement

from .build import FileLayout
from .library import GGUFModel
from .measure import llama_windows, same_positions

NAME = "llamacpp"
SHM = "/dev/shm"


class Reference:
    """One token set as llama.cpp runs it: its windows, the float32 log-probabilities of their scored positions, and
    the FP model's measurement there (loss 0)."""

    def __init__(self, model: LoadedModel, windows: torch.Tensor, batch_size: int):
        self.windows = windows.cpu()  # llama.cpp runs on the CPU, whatever device the model's forward uses
        self.first = windows.shape[1] // 2
        self.logprobs: list[torch.Tensor] = []
        with torch.no_grad():
            for batch in windows.split(batch_size):
                for lp in model_output(model, batch):
                    self.logprobs.append(lp[self.first:-1].cpu().clone())
        self.tokens = len(self.logprobs) * (windows.shape[1] - 1 - self.first)
        self.fp = self.measure(self.logprobs)

    def measure(self, quantized: Iterable[torch.Tensor]) -> Measurement:
        """KL(FP ‖ quantized) per scored token and perplexity, from each window's scored log-probabilities."""
        kl, ppl = same_positions(self.logprobs, quantized, self.windows, scored=True)
        return Measurement(loss=max(kl, 0.0), quality=ppl, tokens=self.tokens)


def scratch_dir(size: int) -> str | None:
    """Where a candidate's file goes: shared memory where it has room for two (no disk writeback: the file lives
    only until libllama has mapped it), else the system's temporary folder."""
    try:
        free = os.statvfs(SHM)
        if free.f_bavail * free.f_frsize > 2 * size and os.access(SHM, os.W_OK):
            return SHM
    except OSError:
        pass
    return None


def check_windows(model: LoadedModel, levels: Levels, token_sets: Mapping[str, torch.Tensor]) -> None:
    """Refuse, in the job's process, token sets the GGUF's vocabulary spells otherwise than the model's tokenizer
    (Ray workers, which hold no tokenizer, run them unchecked)."""
    float_file = float_gguf(model, levels.stores["gguf"].folder)
    for tokens in token_sets.values():
        llama_windows(model, tokens, float_file)


class LlamaCppRunner(TaskRunner):
    """A backend (`bitalloc.tasks.Backend`) whose config tasks llama.cpp measures, in this process with `threads`
    threads (a Ray worker's CPUs). Every layer of a config must be at a llama.cpp type (the `llamacpp` target's)."""

    def __init__(self, model: LoadedModel, levels: Levels, token_sets: Mapping[str, torch.Tensor],
                 batch_size: int = 2, threads: int | None = None):
        if model.metric == HIDDEN_STATE:
            raise BitallocError("search.evaluator", f"{NAME} measures next-token models; {model.source!r} is measured "
                                                    f"on hidden states: use evaluator: torch")
        if "gguf" not in levels.stores:
            raise BitallocError("search.evaluator", f"{NAME} runs llama.cpp's own levels: formats.target: llamacpp "
                                                    f"(or method: gguf formats), or evaluator: torch")
        self.model, self.levels, self.batch_size = model, levels, batch_size
        self.token_sets = dict(token_sets)
        self.threads = threads or torch.get_num_threads()
        self.layout = FileLayout(model, levels, "formats")
        self.meta, self.alignment = self.layout.metadata()
        self._references: dict[str, Reference] = {}
        self._torch: LocalRunner | None = None

    def reference(self, name: str) -> Reference:
        if name not in self._references:
            base, _, limit = name.partition(":")
            tokens = self.token_sets[base]
            tokens = token_subset(tokens, int(limit)) if limit else tokens
            windows = llama_windows(self.model, tokens, self.layout.float_file)
            self._references[name] = Reference(self.model, windows, self.batch_size)
        return self._references[name]

    def candidate_file(self, assignment: Mapping[str, str]) -> Path:
        """The candidate's GGUF in a new temporary file (the caller removes it): each named layer at its level, every
        other tensor the float file's."""
        formats = {name: self.levels.format_named(fmt) for name, fmt in assignment.items()}
        for name, fmt in formats.items():  # a 16-bit layer is llama.cpp's f16 or bf16 of the float tensor
            if fmt.quantized and (not fmt.ggml or not fmt.fits(self.levels.layers[name].in_features)):
                raise BitallocError("search.evaluator", f"{name} is at {fmt.name}, which llama.cpp does not run on "
                                                        f"its rows; {NAME} measures llama.cpp types that fit")
        tensors, _ = self.layout.tensors(formats)
        size = sum(t.data.nbytes for t in tensors)
        fd, name = tempfile.mkstemp(prefix="bitalloc-candidate-", suffix=".gguf", dir=scratch_dir(size))
        os.close(fd)
        try:
            write_file(Path(name), self.meta, tensors, self.alignment)
        except BaseException:  # a full disk, an interrupt: no half-written file left behind
            Path(name).unlink()
            raise
        return Path(name)

    def run(self, task: EvalTask) -> Measurement:
        if task.noise is not None:
            if self._torch is None:
                self._torch = LocalRunner(self.model, self.levels, self.token_sets, self.batch_size)
            return self._torch.run(task)
        ref = self.reference(task.tokens)
        if not task.assignment:
            return ref.fp
        path = self.candidate_file(dict(task.assignment))
        # a stop arriving inside libllama (in its log callback, where ctypes swallows exceptions) would be lost:
        # recorded instead, and raised between its calls
        with deferred_signals() as stopped:
            try:
                gguf = GGUFModel(path, ref.windows.shape[1], self.threads)
            finally:
                path.unlink()  # mapped by now: the pages stay until the model is freed
            def logprobs():  # one window's at a time
                for window in ref.windows:
                    if stopped:
                        raise Interrupted(stopped[0])
                    yield torch.log_softmax(torch.from_numpy(gguf.logits(window.numpy(), ref.first)), -1)

            with closing(gguf):
                measured = ref.measure(logprobs())
            if stopped:
                raise Interrupted(stopped[0])
        return measured
