"""Fused dequantize + matmul on packed weights (layout in `packed`), in Triton, for every bit width.

y[M, N] = x[M, K] @ W[N, K]^T with W read from its packed words, scales and zero points:

- `gemv` (batch 1 to 8): a program owns BLOCK_N output rows and walks K; weights are unpacked
  in registers and multiplied against the few input rows, no tensor cores (bandwidth-bound).
- `gemm` (larger batches): BLOCK_M x BLOCK_N tiles, each BLOCK_K slice dequantized into registers
  and fed to `tl.dot` (tensor cores).

The bit width, group size and symmetry are compile-time constants; a code that straddles two words
(3/5/6 bits) is assembled from both. Tiles are autotuned on GPUs; under TRITON_INTERPRET=1 (CI, CPU
tensors) one fixed small tile runs, since timing configs in the interpreter means nothing.
Works on Triton 3.6 and 3.9: only core `tl` operations are used.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .packed import PackedWeight, offset

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
GEMV_MAX_M = 8


@triton.jit
def _dequant_tile(q_ptr, s_ptr, z_ptr, offs_n, offs_k, N, K, n_words, n_groups,
                  BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, OFFSET: tl.constexpr):
    """W[offs_n, offs_k] as float32 [BLOCK_N, BLOCK_K], unpacked from the bit streams of its rows."""
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    bit = offs_k * BITS
    word = bit // 32
    shift = (bit % 32).to(tl.uint32)
    row = offs_n[:, None].to(tl.int64) * n_words
    lo = tl.load(q_ptr + row + word[None, :], mask=mask, other=0).to(tl.uint32)
    code = lo >> shift[None, :]
    if (32 % BITS) != 0:
        spans = (shift + BITS) > 32
        hi_mask = mask & spans[None, :] & ((word + 1)[None, :] < n_words)
        hi = tl.load(q_ptr + row + word[None, :] + 1, mask=hi_mask, other=0).to(tl.uint32)
        code = code | tl.where(spans[None, :], hi << ((32 - shift) & 31)[None, :], 0)
    code = (code & ((1 << BITS) - 1)).to(tl.float32)
    g = offs_k // GROUP
    sidx = offs_n[:, None].to(tl.int64) * n_groups + g[None, :]
    scale = tl.load(s_ptr + sidx, mask=mask, other=0.0).to(tl.float32)
    if SYM:
        w = (code - OFFSET) * scale
    else:
        zero = tl.load(z_ptr + sidx, mask=mask, other=0.0).to(tl.float32)
        w = code * scale + zero
    return tl.where(mask, w, 0.0)


@triton.jit
def _gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K, n_words, n_groups, stride_xm, stride_ym,
                 BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, OFFSET: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    for m in range(0, M):
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            w = _dequant_tile(q_ptr, s_ptr, z_ptr, offs_n, offs_k, N, K, n_words, n_groups, BITS, GROUP, SYM, OFFSET)
            x = tl.load(x_ptr + m * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            acc += tl.sum(w * x[None, :], axis=1)
        tl.store(y_ptr + m * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _gemm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K, n_words, n_groups, stride_xm, stride_ym,
                 BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, OFFSET: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _dequant_tile(q_ptr, s_ptr, z_ptr, offs_n, offs_k, N, K, n_words, n_groups, BITS, GROUP, SYM, OFFSET)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)), out_dtype=tl.float32)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def _gemv_configs():
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
            for n, k, w in ((32, 256, 4), (64, 128, 4), (64, 256, 4), (128, 128, 4), (128, 256, 8), (256, 64, 8))]


def _gemm_configs():
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in ((16, 64, 64, 4, 3), (32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (64, 128, 64, 4, 4),
                                  (64, 128, 32, 4, 4), (128, 128, 64, 8, 3), (32, 128, 128, 4, 3))]


_KEY = ["N", "K", "BITS", "GROUP"]
if INTERPRET:
    GEMV, GEMM = _gemv_kernel, _gemm_kernel
    _FIXED = {"gemv": {"BLOCK_N": 16, "BLOCK_K": 32}, "gemm": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}}
else:
    GEMV = triton.autotune(_gemv_configs(), key=_KEY)(_gemv_kernel)
    GEMM = triton.autotune(_gemm_configs(), key=_KEY + ["M"])(_gemm_kernel)
    _FIXED = {"gemv": {}, "gemm": {}}


def packed_matmul(x: torch.Tensor, p: PackedWeight, kernel: str | None = None) -> torch.Tensor:
    """x [M, K] (contiguous rows) @ W^T -> [M, N] in x's dtype; `kernel` forces gemv or gemm."""
    M, K = x.shape
    N = p.out_features
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    kernel = kernel or ("gemv" if M <= GEMV_MAX_M else "gemm")
    zeros = p.zeros if p.zeros is not None else p.scales
    meta = dict(BITS=p.fmt.bits, GROUP=p.fmt.group_size, SYM=p.fmt.symmetric, OFFSET=offset(p.fmt),
                **_FIXED[kernel])
    args = (x, p.qweight, p.scales, zeros, y, M, N, K, p.qweight.shape[1], p.scales.shape[1], x.stride(0), y.stride(0))
    if kernel == "gemv":
        GEMV[lambda m: (triton.cdiv(N, m["BLOCK_N"]),)](*args, **meta)
    else:
        GEMM[lambda m: (triton.cdiv(M, m["BLOCK_M"]), triton.cdiv(N, m["BLOCK_N"]))](*args, **meta)
    return y
