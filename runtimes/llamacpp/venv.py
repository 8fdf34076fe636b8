"""llama.cpp's side in the runtimes' environment: gguf-py reads the types file's every type (see runtimes/venv.py)."""

from __future__ import annotations

import re

LIBRARY = "gguf"


def check(path: str, config: dict | None) -> str:
    import gguf

    types = {t.name.lower(): t for t in gguf.GGMLQuantizationType}
    n = 0
    with open(path) as fh:
        for i, line in enumerate(fh.read().split(), 1):
            pattern, sep, typ = line.rpartition("=")
            if not sep or not pattern or typ.lower() not in types:
                raise ValueError(f"entry {i} {line!r} is not REGEX=TYPE with a ggml type")
            re.compile(pattern)
            n += 1
    return f"llama-quantize tensor types: {n} REGEX=TYPE entries, every type known to gguf {gguf.__name__}"
