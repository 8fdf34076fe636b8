"""Peak memory and time of a whole job on random-init Llama models of real shapes, and print a table.

    .venv/bin/python benchmarks/memory.py [--shapes 135m,360m,1b] [--estimator fisher] [--dtype bfloat16]

Each shape is built in code (SmolLM2's tokenizer; bfloat16 weights as real checkpoints ship, or float32) and searched by
`bitalloc run` in a child process: six formats (w2-w8, g64 asymmetric), 2 x 256 calibration and 2 x 256 held-out
tokens, evaluations in process, tracking off, a fresh cache (every level is made, every estimator runs). The
child's peak RSS comes from the kernel (wait4), stage times and the level store's size from front.json, the plan's
total from its printed line; a job the memory plan refuses is reported with its one-line reason. Quality numbers of random
weights mean nothing; memory and time do.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

SHAPES = {  # hidden, intermediate, blocks, heads, kv heads, vocabulary
    "135m": (576, 1536, 30, 9, 3, 49152),  # SmolLM2-135M
    "360m": (960, 2560, 32, 15, 5, 49152),  # SmolLM2-360M
    "1b": (2048, 8192, 16, 32, 8, 49152),  # Llama-3.2-1B (SmolLM2's vocabulary)
    "8b": (4096, 14336, 32, 32, 8, 128256),  # Llama-3.1-8B (for a GPU machine)
}


def build(shape: str, folder: Path, dtype: str) -> int:
    """Save a random-init Llama of the shape with SmolLM2's tokenizer; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bitalloc.model import load_model

    hidden, inter, blocks, heads, kv, vocab = SHAPES[shape]
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=blocks,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=2048, tie_word_embeddings=True, torch_dtype=dtype)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    load_model("smollm2-135m").tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def run(model_dir: Path, out: Path, estimator: str) -> tuple[int, float, str, int, str]:
    """Exit code, wall seconds and last stderr line of `bitalloc run`, the child's peak RSS in bytes, and the memory
    plan's total."""
    spec = {"name": model_dir.name, "model": {"source": str(model_dir)},
            "formats": {"bits": [2, 3, 4, 5, 6, 8], "group_size": 64},
            "data": {"seq_len": 256, "calibration": 2, "evaluation": 2},
            "sensitivity": {"estimator": estimator}, "search": {"budgets": [3.5, 4.5], "points": 2},
            "run": {"workers": 0}, "tracking": {"enabled": False}, "output": str(out)}
    path = out.parent / f"{model_dir.name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    start = time.perf_counter()
    env = {**os.environ, "BITALLOC_CACHE": str(out.parent / "cache")}  # every estimator runs, none is a cache hit
    proc = subprocess.Popen([sys.executable, "-m", "bitalloc.cli", "run", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    lines = [l for l in err.splitlines() if l.strip()]
    planned = re.search(r"total (\S+ \S+) of", err)
    return (os.waitstatus_to_exitcode(status), time.perf_counter() - start, lines[-1] if lines else "",
            usage.ru_maxrss * 1024, planned.group(1) if planned else "-")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="135m,360m,1b")
    ap.add_argument("--estimator", default="fisher")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args()
    table = Table(title=f"a whole job on random-init {args.dtype} shapes: six formats, 2x256 + 2x256 tokens, "
                        f"{args.estimator}, in process ({os.cpu_count()} CPUs)")
    for col in ("shape", "params", "result", "planned", "peak RSS GiB", "bytes/param", "levels MiB", "wall s",
                "load s", "quantize s", "sensitivity s", "measure s", "s/candidate"):
        table.add_column(col, justify="left" if col in ("shape", "result") else "right")
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bitalloc-memory-") as tmp:
        for shape in args.shapes.split(","):
            model_dir = Path(tmp) / f"llama-{shape}"
            params = build(shape, model_dir, args.dtype)
            code, wall, last, peak, planned = run(model_dir, Path(tmp) / f"out-{shape}", args.estimator)
            stages, levels, per_candidate = {}, "-", "-"
            if code == 0:
                front = json.loads((Path(tmp) / f"out-{shape}" / "front.json").read_text())
                timings = front["timings_s"]
                levels = f"{front['memory']['level_store_bytes'] / 2**20:.0f}"
                measured = len(front["points"]) + 1  # and the FP reference
                per_candidate = f"{sum(v for k, v in timings.items() if k.startswith('measure')) / measured:.1f}"
                for key, label in (("load", "load"), ("quantize", "quantize"), ("sensitivity", "sensitivity"),
                                   ("measure", "measure")):
                    stages[label] = sum(v for k, v in timings.items() if k.startswith(key))
            result = "ok" if code == 0 else "refused (below)" if code == 2 else f"exit {code} (below)"
            if code:
                notes.append(f"{shape}: {last}")
            table.add_row(shape, f"{params / 1e6:.0f} M", result, planned, f"{peak / 2**30:.2f}",
                          f"{peak / params:.1f}" if code == 0 else "-", levels,
                          f"{wall:.0f}", *[f"{stages[s]:.1f}" if s in stages else "-"
                                           for s in ("load", "quantize", "sensitivity", "measure")], per_candidate)
            Console(stderr=True).print(f"{shape}: {result}, peak {peak / 2**30:.2f} GiB")
    table.caption = "\n".join(notes) or None
    Console(width=220).print(table)


if __name__ == "__main__":
    main()
