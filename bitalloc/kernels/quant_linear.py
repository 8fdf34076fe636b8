"""`QuantLinear`: a Linear (or GPT-2 Conv1D) whose weight lives packed (see `packed`).

On CUDA it runs the Triton kernels (GEMV up to batch 8, GEMM above); on CPU it dequantizes with
torch, or, under TRITON_INTERPRET=1, runs the same Triton kernels in the interpreter. An input the
kernels cannot take (a dtype other than fp16/bf16/fp32, no Triton on the GPU) falls back to the torch
path with a warning, never a wrong answer.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from bitalloc.formats import Format

from .packed import PackedWeight, dequantize_packed, words_per_row
from .rtn import TORCH_DTYPES

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_matmul():
    try:
        from .triton_matmul import INTERPRET, packed_matmul
    except ImportError:
        return None, False
    return packed_matmul, INTERPRET


def register_packed(module: nn.Module, rows: int, in_features: int, fmt: Format, device=None) -> None:
    """Zeroed `qweight`, `scales` and `zeros` buffers of a [rows, in_features] weight packed at `fmt`."""
    groups = -(-in_features // fmt.group_size)
    sdt = TORCH_DTYPES[fmt.scale_dtype]
    module.register_buffer("qweight", torch.zeros(rows, words_per_row(in_features, fmt.bits), dtype=torch.int32,
                                                  device=device))
    module.register_buffer("scales", torch.zeros(rows, groups, dtype=sdt, device=device))
    module.register_buffer("zeros", None if fmt.symmetric else torch.zeros(rows, groups, dtype=sdt, device=device))


class FallsBack:
    """A packed module that says once, with what it is, when an input sends it down the torch path."""

    _warned = False

    def _fallback(self, why: str) -> None:
        if not self._warned:
            warnings.warn(f"{type(self).__name__}({self.extra_repr()}): {why}; using the torch dequantize path",
                          stacklevel=4)
            self._warned = True


class QuantLinear(FallsBack, nn.Module):
    """y = x W^T + b with W [out, in] packed at `fmt`; the bytes held are the packed bytes."""

    def __init__(self, in_features: int, out_features: int, fmt: Format, bias: bool, dtype: torch.dtype,
                 device=None):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        register_packed(self, out_features, in_features, fmt, device)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_packed(cls, packed: PackedWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> "QuantLinear":
        layer = cls(packed.in_features, packed.out_features, packed.fmt, bias is not None, dtype,
                    device=packed.qweight.device)
        layer.qweight, layer.scales, layer.zeros = packed.qweight, packed.scales, packed.zeros
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    @classmethod
    def swap_in(cls, root: nn.Module, name: str, packed: PackedWeight) -> nn.Module:
        """Replace the Linear `name` under `root` by a QuantLinear over `packed` (its bias and dtype kept); returns
        the module replaced, to put back."""
        module = root.get_submodule(name)
        root.set_submodule(name, cls.from_packed(packed, module.bias, module.weight.dtype))
        return module

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(self.qweight, self.scales, self.zeros, self.fmt, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.name}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = packed_linear(x.reshape(-1, self.in_features), self.packed, self._fallback)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)


def packed_linear(x2: torch.Tensor, packed: PackedWeight, fallback) -> torch.Tensor:
    """x2 [tokens, in] @ W^T for W packed: the Triton kernels on CUDA (or in the interpreter), else torch's
    dequantize path; `fallback(why)` is told when an input the kernels should take cannot be."""
    matmul, interpret = _triton_matmul()
    use_kernel = x2.is_cuda or interpret
    if use_kernel and matmul is None:
        fallback("Triton is not installed")
        use_kernel = False
    if use_kernel and x2.dtype not in _KERNEL_DTYPES:
        fallback(f"the kernels take fp16/bf16/fp32 inputs, not {x2.dtype}")
        use_kernel = False
    if use_kernel:
        return matmul(x2.contiguous(), packed)
    return x2 @ dequantize_packed(packed, x2.dtype).t()
