"""The size of HQQ's saved model of a point, computed without writing it or reading a level.

`AutoHQQHFModel.save_quantized` pickles, with `torch.save`, one dict per leaf module that has state: an `HQQLinear`'s
packed `W_q`, float16 `scale` and `zero` per group and its meta values, every other module's `state_dict()` in
float16 (HQQ's compute dtype; a tied head's weight stored once, its storage shared). The same dicts are built here —
each tensor a stand-in of its dtype and shape, the meta values as HQQ keeps them — and passed through `torch.save`
through a pipe that only counts, so the zip records, their 64-byte alignment and the pickle are torch's own. Beside
`qmodel.pt` the folder holds HQQ's `config.json` (the model's config, its architecture named) and the tokenizer."""

from __future__ import annotations

import copy
import math
import os
import tempfile
import threading

import torch

from bitalloc.quantizers.layouts import HQQ_CODES_PER_UNIT
from bitalloc.types import FileBytes

from ..folder import reference_bytes, tokenizer_bytes

_PACKING = {8: "8bit_u8", 4: "4bit_u8", 3: "3bit_32", 2: "2bit_u8"}  # HQQ's Quantizer.bit_to_packing
_UNIT_DTYPE = {1: torch.uint8, 4: torch.int32}  # W_q's dtype by the bytes of its packing unit


def saved_size(obj, name: str) -> int:
    """The bytes `torch.save(obj, .../name)` writes, counted through a named pipe (torch names the zip's records
    after the file, so the count must come from a file of that name), nothing stored."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        os.mkfifo(path)
        size = [0]

        def count() -> None:
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    size[0] += len(chunk)

        reader = threading.Thread(target=count)
        reader.start()
        try:
            torch.save(obj, path)
        except BaseException:
            try:  # a save that failed before opening the pipe: the reader is still waiting for a writer
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
            raise
        finally:
            reader.join()
        return size[0]


def _hqq_linear(fmt, out_features: int, in_features: int, bias) -> dict:
    """An HQQLinear's `state_dict()` as HQQ builds it (W_q, its meta, bias, the quant config's weight parameters)."""
    groups = out_features * in_features // fmt.group_size
    per, unit = HQQ_CODES_PER_UNIT[fmt.bits]  # group rows per row of W_q, and its bytes per code slot
    codes = torch.empty(math.ceil(groups / per), fmt.group_size, dtype=_UNIT_DTYPE[unit])
    state = {"W_q": torch.nn.Parameter(codes, requires_grad=False),  # HQQLinear's one parameter
             "nbits": fmt.bits, "group_size": fmt.group_size, "shape": torch.Size([out_features, in_features]),
             "scale": torch.empty(groups, 1, dtype=torch.float16), "zero": torch.empty(groups, 1, dtype=torch.float16),
             "axis": 1, "packing": _PACKING[fmt.bits], "unpack_view_dtype": codes.dtype,
             "view_as_float": False, "quant_scale": False, "quant_zero": False, "compute_dtype": torch.float16,
             "optimize": True}
    if bias is not None:
        state["bias"] = bias
    state.update(offload_meta=False, stores_quant_config=True, channel_wise=True, round_zero=fmt.bits == 4)
    return state


def qmodel_bytes(module: torch.nn.Module, formats: dict) -> tuple[int, int]:
    """(`qmodel.pt`'s bytes, its quantized layers' W_q, scale and zero bytes) with the Linear layers named in
    `formats` quantized at their format."""
    half: dict[int, torch.Tensor] = {}

    def fp16(t: torch.Tensor) -> torch.Tensor:
        key = t.data_ptr()  # a tied weight: one storage, as the model HQQ loads in float16 shares it
        if key not in half:
            half[key] = torch.empty(t.shape, dtype=torch.float16) if t.is_floating_point() else t
        return half[key].detach()

    weights, stored = {}, 0
    for name, m in module.named_modules():
        if m._modules:
            continue
        fmt = formats.get(name)
        if fmt is not None and fmt.quantized:
            bias = None if getattr(m, "bias", None) is None else fp16(m.bias)
            state = _hqq_linear(fmt, m.out_features, m.in_features, bias)
            stored += sum(state[k].numel() * state[k].element_size() for k in ("W_q", "scale", "zero"))
            weights[name] = state
            continue
        state = {k: fp16(v) for k, v in m.state_dict().items()}
        if state:
            weights[name] = state
    return saved_size(weights, "qmodel.pt"), stored


def config_bytes(module: torch.nn.Module) -> int:
    """HQQ's `config.json`: the model's config saved with its architecture named, in float16."""
    config = copy.deepcopy(module.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(module).__name__]
    config.dtype = torch.float16
    return len(config.to_json_string(use_diff=True).encode())


def point_bytes(ws, formats: dict) -> tuple[int, int]:
    """(HQQ's folder of the point at `formats`, model card aside; its quantized layers' stored bytes)."""
    pt, stored = qmodel_bytes(ws.model.module, formats)
    return pt + config_bytes(ws.model.module) + tokenizer_bytes(ws), stored


def folder_bytes(ws) -> FileBytes | None:
    """How HQQ's folder stores the job's points: the folder with every layer at the job's first format it takes,
    less those layers' tensors, each layer then adding its own (the `hqq` layout's count). The zip's alignment and
    the pickle's references vary by some bytes from point to point: `verify` reports the written folder's
    difference. None for expert units, which HQQ's folder does not hold (`check_storable`)."""
    if any(l.experts for l in ws.layers):
        return None
    return reference_bytes("hqq", ws, lambda formats: point_bytes(ws, formats))
