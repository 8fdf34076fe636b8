"""llama.cpp in this process: the libllama built beside its tools (`quantizers/gguf/tools.py`), driven through the
ctypes bindings of the same `llama-cpp-python` sdist, so a GGUF's logits come from the code `llama-perplexity` runs.

Only the low-level module (`llama_cpp.llama_cpp`) is imported: the package's `__init__` pulls in its server and chat
helpers (jinja2, diskcache), which nothing here needs. Context settings are llama-perplexity's for a window of
`n_ctx` tokens decoded as one batch (`-c n_ctx -b n_ctx`, every other setting at its default), so the arithmetic is
the same: weight repacking, flash attention and the f16 KV cache as the tool has them.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import sys
import types
from pathlib import Path

import numpy as np

from bitalloc.errors import BitallocError
from bitalloc.quantizers.gguf import tools

_BINDINGS = None


def bindings():
    """`llama_cpp.llama_cpp` over this cache's libllama (built on first use), its backend initialised and its log
    silenced (llama.cpp logs every load to stderr)."""
    global _BINDINGS
    if _BINDINGS is None:
        library = tools.tool(tools.LIBRARY)
        package = library.parent.parent / "python" / "llama_cpp"
        loaded = sys.modules.get("llama_cpp")
        if loaded is not None and Path(getattr(loaded, "__path__", [""])[0]) != package:
            raise BitallocError("llama.cpp", f"another llama_cpp package is imported ({loaded.__path__[0]}); the "
                                             f"evaluator needs the one built with its tools")
        if loaded is None:  # the package without its __init__ (see the module's docstring)
            stub = types.ModuleType("llama_cpp")
            stub.__path__ = [str(package)]
            sys.modules["llama_cpp"] = stub
        os.environ["LLAMA_CPP_LIB_PATH"] = str(library.parent)
        lib = importlib.import_module("llama_cpp.llama_cpp")
        quiet = lib.llama_log_callback(lambda level, text, user: None)
        lib.llama_log_set(quiet, ctypes.c_void_p())
        lib.llama_backend_init()
        _BINDINGS = (lib, quiet)  # the callback is kept alive as long as the library
    return _BINDINGS[0]


class GGUFModel:
    """A GGUF loaded by libllama (memory-mapped: a file in the page cache costs no copy) with one context for
    windows of `n_ctx` tokens; `logits` runs one window and returns the logits of the positions asked for."""

    def __init__(self, path: Path, n_ctx: int, threads: int):
        self.lib = lib = bindings()
        self.model = lib.llama_model_load_from_file(str(path).encode(), lib.llama_model_default_params())
        if not self.model:
            raise BitallocError("llama.cpp", f"libllama could not load {path.name}")
        params = lib.llama_context_default_params()
        params.n_ctx = params.n_batch = n_ctx
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise BitallocError("llama.cpp", f"libllama could not make a {n_ctx}-token context for {path.name}")
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.n_ctx = n_ctx
        self.batch = lib.llama_batch_init(n_ctx, 0, 1)

    def logits(self, tokens: np.ndarray, first: int) -> np.ndarray:
        """float32 [len(tokens) − 1 − first, n_vocab]: the logits at positions first … len − 2 of one window,
        decoded from an empty cache as one batch (what llama-perplexity's KL-divergence mode reads)."""
        lib, batch, n = self.lib, self.batch, len(tokens)
        if n > self.n_ctx:
            raise ValueError(f"a window of {n} tokens in a {self.n_ctx}-token context")
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        batch.n_tokens = n
        for i, token in enumerate(tokens.tolist()):
            batch.token[i] = token
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = first <= i < n - 1
        if lib.llama_decode(self.ctx, batch) != 0:
            raise BitallocError("llama.cpp", f"llama_decode failed on a {n}-token window")
        rows = n - 1 - first
        out = np.ctypeslib.as_array(lib.llama_get_logits(self.ctx), shape=(rows * self.n_vocab,))
        return out.reshape(rows, self.n_vocab).copy()

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = self.model = None
