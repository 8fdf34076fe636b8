"""Quantizers: how a weight becomes a level (its stored form at one format), one module each, registered by name
with the byte layout its levels are stored in (`layouts`); the level store keeps the levels (`store`).

    rtn      min-max round-to-nearest per group: bitalloc's packed kernels' reference
    rtn-int  round-to-nearest on GPTQ's integer grid (0 in range, integer zero points), which compressed-tensors
             uses too: what llm-compressor's QuantizationModifier makes
    clip     round-to-nearest over the per-group range (shrunk from min-max) of least squared error, each input
             column weighted by its mean squared input on the calibration tokens
    gptq     GPTQ from each layer's input Hessian on the calibration tokens, FP inputs, each layer on its own
    gptq-ct  the same GPTQ as llm-compressor runs it, its bytes counted as compressed-tensors stores them
    hqq      HQQ's half-quadratic optimisation of zero points (the `hqq` package), no calibration data
    gguf     llama.cpp's ggml types, made by the built llama-quantize (optionally with llama-imatrix's matrix)

A new quantizer is one module here (or in a subpackage) defining a `QuantizerBase` subclass under `@register`.
"""

from bitalloc.registry import discover

from .base import QUANTIZERS, Calibration, Level, Quantizer, QuantizerBase, get_quantizer, layout_of, register

discover(__name__, __path__)

__all__ = ["QUANTIZERS", "Calibration", "Level", "Quantizer", "QuantizerBase", "get_quantizer", "layout_of",
           "register"]
