"""Runtimes bitalloc searches for, exports to and verifies in: one subpackage each, holding its target (formats,
quantizers, ties), its export, its verify and the part that runs with the runtime's own code (`venv.py`), behind one
`Runtime` class registered by name (`base`).

    llamacpp       llama.cpp's ggml types by llama-quantize; a tensor-type file; verified by llama-perplexity
    gptqmodel      GPTQ checkpoints (GPTQModel, vLLM); a quantize_config.json with per-layer `dynamic` rules
    llmcompressor  compressed-tensors (vLLM); an llm-compressor recipe
    hqq            HQQ; transformers' HqqConfig arguments per layer tag
    bitalloc       bitalloc's packed kernels; a packed checkpoint (`bitalloc pack`)

A new runtime is one subpackage here whose `__init__` registers a `Runtime` subclass (and its `venv.py` when the
runtime's own code checks or builds); `tests/test_runtimes.py` checks that every registered runtime has every part.
"""

from bitalloc.registry import discover

from .base import RUNTIMES, Layer, Placement, Runtime, get_runtime, layers_of, register

discover(__name__, __path__, skip=("venv",))

__all__ = ["RUNTIMES", "Layer", "Placement", "Runtime", "get_runtime", "layers_of", "register"]
