"""Low-bit weight kernels. `rtn` is the torch reference quantizer that every faster path is checked against."""

from .rtn import QuantizedWeight, dequantize, fake_quantize, quantize

__all__ = ["QuantizedWeight", "dequantize", "fake_quantize", "quantize"]
