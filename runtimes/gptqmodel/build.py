"""GPTQModel's artifact: a GPTQ checkpoint (GPTQModel's `gptq` format, which vLLM and transformers load too) written
from the level store, instead of GPTQModel quantizing the model again.

GPTQ packs each output column's codes along the input, densely into int32 words: the transpose of bitalloc's packed
rows, so `qweight` is the level's words transposed. `scales` are its float16 scales [groups, out]; `qzeros` the
symmetric zero point 2^(b-1), stored minus one as the `gptq` (v1) format keeps it, packed along the output; `g_idx`
each input column's group. Its `quantize_config.json` is the exported file, also the config's
`quantization_config`."""

from __future__ import annotations

import json

import torch

from bitalloc.kernels.packed import pack_codes

from ..folder import Checkpoint


def layer_tensors(level) -> dict[str, torch.Tensor]:
    bits, gs = level.fmt.bits, level.fmt.group_size
    groups = level.scales.shape[1]
    zeros = torch.full((groups, level.out_features), 2 ** (bits - 1) - 1, dtype=torch.int64)
    return {"qweight": level.qweight.T.contiguous(), "qzeros": pack_codes(zeros, bits),
            "scales": level.scales.T.contiguous(),
            "g_idx": torch.arange(level.in_features, dtype=torch.int32) // gs}


def checkpoint(runtime, layers, model_type, quantizers) -> Checkpoint:
    text, _ = runtime.export(layers, model_type, nearest=False, quantizers=quantizers)
    return Checkpoint(layer_tensors, json.loads(text), {"quantize_config.json": text})
