"""Measured per-layer latency on the current GPU: every layer shape x format, for the ILP's latency limit.

Each (out, in, format) runs the packed kernel (16-bit: fp16 `torch.matmul`) on random weights of that
shape, timed by `triton.testing.do_bench` (CUDA events, warm-up, the L2 cache cleared before every
repetition, median). The table is `bitalloc.latency/1`: {schema, device, batch, entries: [{out, in,
format, seconds}]}, which `search.latency_table` reads.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from bitalloc.errors import BitallocError
from bitalloc.formats import Format

SCHEMA = "bitalloc.latency/1"


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise BitallocError("latency", "measuring kernels needs a CUDA GPU, and none is visible here")


def time_layer(out_features: int, in_features: int, fmt: Format, batch: int, seed: int = 0) -> float:
    """Median seconds of one forward of a [out, in] layer at `fmt` on a [batch, in] fp16 input."""
    import triton.testing

    from .packed import pack_weight
    from .triton_matmul import packed_matmul

    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(out_features, in_features, device="cuda", generator=g, dtype=torch.float16)
    x = torch.randn(batch, in_features, device="cuda", generator=g, dtype=torch.float16)
    if fmt.quantized:
        packed = pack_weight(w, fmt)
        fn = lambda: packed_matmul(x, packed)  # noqa: E731
    else:
        fn = lambda: torch.matmul(x, w.t())  # noqa: E731
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def latency_table(shapes: Iterable[tuple[int, int]], formats: Iterable[Format], batch: int,
                  progress: Callable[[int], None] | None = None) -> dict:
    require_cuda()
    entries = []
    for out_features, in_features in sorted(set(shapes)):
        for fmt in formats:
            entries.append({"out": out_features, "in": in_features, "format": fmt.name,
                            "seconds": time_layer(out_features, in_features, fmt, batch)})
        if progress:
            progress(1)
    return {"schema": SCHEMA, "device": torch.cuda.get_device_name(), "batch": batch,
            "torch": torch.__version__, "entries": entries}
