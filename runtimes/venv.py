"""The runtimes' own code, run where the runtime is installed: each runtime's `venv.py` (beside its package) checks an
exported file with the runtime's parser or config model (`check`) and, for the Python runtimes, builds the model
the way the runtime builds it from that file (`build`).

This file and those modules import only the standard library at module level (and torch, transformers, safetensors
and the runtime inside `build`), so they also run as a script in an environment that has the runtime but not
bitalloc (the test suite keeps one: `.venv-runtimes`):

    python runtimes/venv.py check RUNTIME FILE [BITALLOC_CONFIG.json]
    python runtimes/venv.py build RUNTIME MODEL_DIR EXPORTED_FILE OUT_DIR [CALIBRATION.safetensors]
    python runtimes/venv.py load RUNTIME ARTIFACT OUT_DIR
    python runtimes/venv.py write RUNTIME MODEL_DIR EXPORTED_FILE LEVELS.safetensors OUT_DIR

`check` with a bitalloc config also checks, layer by layer, that the runtime resolves each quantized layer to the
config's bits and group size, and that the runtime's GPTQ runs with the parameters of the GPTQ that made the
config's levels. `build` writes OUT_DIR/weights.safetensors (module name -> float32 [out, in], as the runtime
dequantizes it), OUT_DIR/stored.json (module name -> bytes the runtime stores) and, for checkpoint runtimes, the
checkpoint the runtime saved. `load` reads an artifact `bitalloc build` wrote with the runtime's own loader and
writes the same two files of it. `write` saves, with the runtime's own code, an artifact holding the levels
bitalloc hands it (HQQ's saved model, whose format only HQQ's serializer defines). Each prints one line; exits 1 on
a mismatch or the runtime's error.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GPTQ_METHODS = ("gptq", "gptq-ct")  # the config's quantizers whose parameters a GPTQ runtime must read back


def module_path(runtime: str) -> Path:
    return HERE / runtime / "venv.py"


@functools.cache
def load(runtime: str):
    """A runtime's `venv.py`, loaded from its file once (its package's `__init__` imports bitalloc, which the runtimes'
    environment does not have)."""
    sys.modules.setdefault("bitalloc_venv", sys.modules[__name__])  # what the runtime modules import helpers from
    spec = importlib.util.spec_from_file_location(f"bitalloc_venv_{runtime}", module_path(runtime))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def available(runtime: str) -> bool:
    """Whether the runtime's library is importable here."""
    library = getattr(load(runtime), "LIBRARY", None) if module_path(runtime).is_file() else None
    return library is not None and importlib.util.find_spec(library) is not None


def check(runtime: str, path: str, config: dict | None = None) -> str:
    """A line saying what the runtime's parser accepted; raises ValueError (or the library's error) if not."""
    return load(runtime).check(path, config)


# -- helpers the runtimes' modules share ---------------------------------------------------------------------------
def quantized_layers(config: dict | None) -> dict[str, dict]:
    return {n: f for n, f in (config or {}).get("layers", {}).items() if f["bits"] != 16}


def modules_of(unit: str, shape) -> list[str]:
    """The modules a runtime quantizes for a config's layer: an expert unit ([experts, out, in], named
    `...experts.gate_proj`) is each expert's projection (`...experts.N.gate_proj`), checked at its first and last
    expert."""
    if len(shape) != 3:
        return [unit]
    block, _, projection = unit.rpartition(".")
    return [f"{block}.{e}.{projection}" for e in sorted({0, shape[0] - 1})]


def gptq_of(config: dict | None) -> dict | None:
    """The parameters of the config's GPTQ, as it records them."""
    for method, params in (config or {}).get("quantizers", {}).items():
        if method in GPTQ_METHODS:
            return params
    return None


def same(runtime: str, read: dict, wanted: dict) -> None:
    for key, value in wanted.items():
        if read[key] != value:
            raise ValueError(f"{runtime} reads {key} {read[key]!r}, the levels were made with {value!r}")


def save_weights(out: Path, weights: dict, stored: dict[str, int]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.float().contiguous() for k, v in weights.items()}, str(out / "weights.safetensors"))
    (out / "stored.json").write_text(json.dumps(stored))


def stored_bytes(checkpoint: Path, counts) -> dict[str, int]:
    """Bytes per layer of the checkpoint's safetensors tensors named LAYER.PART, for the parts `counts` takes."""
    from safetensors import safe_open

    stored: dict[str, int] = {}
    for file in checkpoint.glob("*.safetensors"):
        with safe_open(str(file), "pt") as fh:
            for key in fh.keys():
                layer, _, part = key.rpartition(".")
                if counts(part):
                    t = fh.get_tensor(key)
                    stored[layer] = stored.get(layer, 0) + t.numel() * t.element_size()
    return stored


def main(argv: list[str]) -> int:
    command, runtime, *args = argv
    try:
        if command == "check":
            config = json.loads(Path(args[1]).read_text()) if len(args) > 1 else None
            print(check(runtime, args[0], config))
        elif command == "load":
            print(load(runtime).load(args[0], Path(args[1])))
        elif command == "write":
            model_dir, exported, levels, out = args
            print(load(runtime).write(model_dir, exported, levels, Path(out)))
        else:
            model_dir, exported, out = args[:3]
            print(load(runtime).build(model_dir, exported, Path(out), args[3] if len(args) > 3 else None))
    except Exception as exc:  # the runtime's own error, as one line for bitalloc to show
        word = "rejected" if command == "check" else "failed"
        print(f"{word}: {type(exc).__name__}: {' '.join(str(exc).split())[:400]}")
        return 1
    return 0


if __name__ == "__main__":
    # run as a script, this folder is first on the path, and its runtime packages (hqq/, gptqmodel/, ...) would
    # shadow the runtimes' own packages of the same names
    if sys.path and Path(sys.path[0] or ".").resolve() == HERE:
        sys.path.pop(0)
    raise SystemExit(main(sys.argv[1:]))
