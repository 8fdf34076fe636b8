"""The default model moved off its quantization grid: SmolLM2-135M ships as a Q4_1 GGUF, whose weights q4_1 (and
any 4-bit format with its groups) reproduces almost exactly, so quality claims made on it flatter 4-bit formats.
Seeded Gaussian noise of 0.1 x each row's standard deviation (about a third of a Q4_1 step: the offsets from the
grid spread over the whole step) on every block weight and the token embedding (a unit of the search, which the
tied head shares), written as an F32 GGUF, leaves no 4-bit grid holding it."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def offgrid_gguf(folder: Path, seed: int = 0) -> Path:
    """The default GGUF with every block weight and the token embedding moved off its grid by seeded noise, as an F32
    GGUF in `folder`."""
    from bitalloc.model import DEFAULT_MODEL, source_files
    from bitalloc.quantizers.gguf.files import float_copy

    path = folder / "smollm2-offgrid-f32.gguf"
    if path.is_file():
        return path
    rng = np.random.default_rng(seed)

    def noisy(name: str, data: np.ndarray) -> np.ndarray:
        if not ((name.startswith("blk.") or name == "token_embd.weight") and data.ndim == 2):
            return data
        return data + rng.standard_normal(data.shape, dtype=np.float32) * 0.1 * data.std(1, keepdims=True)

    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    float_copy(source_files(DEFAULT_MODEL)[1], tmp, noisy)
    tmp.replace(path)
    return path
