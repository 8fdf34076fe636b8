"""Packed Triton kernels vs fp16 torch.matmul on the current GPU: speedup and share of the HBM roofline.

    python benchmarks/packed_kernels.py [--bits 2 3 4 8] [--batches 1 16 64] [--group-size 128]

Times by triton.testing.do_bench (CUDA events, warm-up, L2 cleared per repetition, median). The roofline
is the bytes a call must move (packed weight + scales + zero points + input + output) over the copy
bandwidth measured here (a 1 GiB device-to-device copy counts its read and write).
"""

from __future__ import annotations

import argparse

import torch
import triton.testing
from rich.console import Console
from rich.table import Table

from bitalloc.formats import Format
from bitalloc.kernels.packed import pack_weight
from bitalloc.kernels.triton_matmul import packed_matmul

SHAPES = ((4096, 4096), (8192, 8192), (28672, 8192))  # (out, in)


def copy_bandwidth() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=200, return_mode="median")
    return 2 * src.numel() / (ms / 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/packed_kernels.py needs a CUDA GPU; none is visible here")
    bw = copy_bandwidth()
    table = Table(title=f"{torch.cuda.get_device_name()}: packed kernels vs fp16 matmul "
                        f"(copy bandwidth {bw / 1e9:.0f} GB/s, group {args.group_size}, asymmetric)")
    for col in ("out x in", "batch", "format", "µs", "fp16 µs", "speedup", "% roofline"):
        table.add_column(col, justify="right")
    for out_f, in_f in SHAPES:
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.float16)
        for batch in args.batches:
            x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
            fp16 = triton.testing.do_bench(lambda: torch.matmul(x, w.t()), return_mode="median")
            for bits in args.bits:
                p = pack_weight(w, Format(bits, args.group_size))
                ms = triton.testing.do_bench(lambda: packed_matmul(x, p), return_mode="median")
                moved = p.nbytes + x.numel() * 2 + batch * out_f * 2
                table.add_row(f"{out_f} x {in_f}", str(batch), f"w{bits}", f"{ms * 1e3:.1f}", f"{fp16 * 1e3:.1f}",
                              f"{fp16 / ms:.2f}x", f"{100 * moved / bw / (ms / 1e3):.0f}%")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
