"""HQQ (Badri & Shaji, 2023) by its own package: zero points (and codes) by half-quadratic splitting under an l_p<1
error norm, no calibration data."""

from __future__ import annotations

import torch

from bitalloc.errors import BitallocError
from bitalloc.kernels.packed import PackedWeight, pack
from bitalloc.kernels.rtn import TORCH_DTYPES, QuantizedWeight

from .base import QuantizerBase, register
from .layouts import HQQPacked


@register("hqq")
class HalfQuadratic(QuantizerBase):
    """From min-max, started as HQQ's runtime config starts them (`BaseQuantizeConfig`: zero points rounded at 4
    bits), on the weights as HQQ holds them, in its compute dtype (the format's scale dtype). Kept in bitalloc's
    layout w = q * scale + m with m = -zero * scale in the scale dtype, which HQQ stores as (q - zero) * scale: the
    two differ by the rounding of m (a float16 ulp); counted as HQQ stores it (`layouts.HQQPacked`)."""

    summary = "HQQ's half-quadratic zero-point optimisation (the hqq package, its defaults), calibration-free"
    version = 2  # 1 started 4-bit zero points unrounded and read float32 weights, unlike HQQ's runtime
    layout = HQQPacked()

    def quantize(self, weight, fmt, inputs=None) -> PackedWeight:
        from hqq.core.quantize import Quantizer as HQQ, hqq_base_quant_config

        if fmt.symmetric:
            raise BitallocError("formats.symmetric", "hqq quantizes asymmetrically; use symmetric: false")
        runtime = hqq_base_quant_config(nbits=fmt.bits, group_size=fmt.group_size)["weight_quant_params"]
        sdt = TORCH_DTYPES[fmt.scale_dtype]
        held = weight.detach().to(sdt).float()  # the weights as HQQ holds them: in its compute dtype
        codes, meta = HQQ.quantize(held, nbits=fmt.bits, channel_wise=True,
                                   group_size=fmt.group_size, optimize=True, round_zero=runtime["round_zero"], axis=1,
                                   bitpack=False, compute_dtype=torch.float32, device="cpu")
        rows, cols = weight.shape
        scale = meta["scale"].reshape(rows, -1).to(sdt)
        zero = meta["zero"].reshape(rows, -1).to(sdt)
        m = (-zero.float() * scale.float()).to(sdt)
        return pack(QuantizedWeight(codes.reshape(rows, cols).to(torch.uint8), scale, m, fmt))
