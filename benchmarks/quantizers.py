"""Quantizers compared: uniform KL at 3 and 4 bits, time to build every level, and the mixed front's KL at the bytes of
uniform 3- and 4-bit RTN. Prints one table per model (llama.cpp's presets against its target: `benchmarks/presets.py`).

    .venv/bin/python benchmarks/quantizers.py [--models default,offgrid] [--methods rtn,clip,gptq,hqq,gguf] [--work DIR]

Models: `default` is SmolLM2-135M, whose weights sit on a Q4_1 grid; `offgrid` is the same model with seeded Gaussian
noise (0.1 x each row's standard deviation, about a third of a Q4_1 step: the weights' offsets from the grid are
spread over the whole step) added to every block weight and the token embedding (`bitalloc.offgrid`), written as an F32 GGUF, so no 4-bit grid holds it. Each method is one `bitalloc run` in a child process with a fresh level store (every level is made):
formats w2-w8 at group 64 (hqq: w2/3/4/8) plus w3/w4 at group 128 (asymmetric; gguf: the llamacpp target's types), the default
job's data (4 x 512 calibration and 4 x 512 held-out tokens), the token embedding kept float32 (the
quantizers compared on the blocks' layers, as HQQ's and GPTQ's runtimes store them; the default job's `bitalloc`
target packs the embedding too: README), Fisher, DP, budgets 3.5 / 4.0 / 4.5 average bits
(3.5 and 4.5 are the bytes of uniform w3g64a and w4g64a RTN); llama.cpp's types cannot go below 4.03 bits on
SmolLM2 (its 576-wide rows take only 32-blocks, q4_0 at 4.5 bits the smallest), so gguf gets 4.5 and 5.0. Jobs
keep their results in --work (a finished job there is read, not run again). A uniform format that does not fit a layer
(group 128 on 576-wide rows) stands in as the job's nearest that does (w3g64, w4g64), as `Problem.uniform` does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from bitalloc.offgrid import offgrid_gguf

BUDGETS = (3.5, 4.0, 4.5)
DATA = {"source": "shakespeare", "seq_len": 512, "calibration": 4, "evaluation": 4, "batch_size": 2}


def formats_for(method: str) -> list | dict:
    if method == "gguf":
        return {"target": "llamacpp"}
    bits = [2, 3, 4, 8] if method == "hqq" else [2, 3, 4, 5, 6, 8]  # HQQ has no 5/6-bit
    return [{"bits": bits, "group_size": 64, "method": method},
            {"bits": [3, 4], "group_size": 128, "method": method}]


def run_job(source: str, method: str, budgets: list, out: Path, cache: Path) -> tuple[dict, float]:
    if (out / "front.json").is_file():
        front = json.loads((out / "front.json").read_text())
        return front, sum(front["timings_s"].values())
    spec = {"name": f"{method}", "model": {"source": source, "embeddings": False}, "formats": formats_for(method),
            "data": DATA,
            "sensitivity": {"estimator": "fisher"}, "search": {"solver": "dp", "budgets": budgets, "points": 0},
            "tracking": {"enabled": False}, "output": str(out)}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(spec))
    start = time.perf_counter()
    env = {**os.environ, "BITALLOC_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-m", "bitalloc.cli", "run", str(path)], capture_output=True, text=True,
                          env=env)
    if done.returncode:
        raise SystemExit(f"{method} on {source}: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads((out / "front.json").read_text()), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="default,offgrid")
    ap.add_argument("--methods", default="rtn,clip,gptq,hqq,gguf")
    ap.add_argument("--work", default=None, help="folder for the jobs' results (default: a temporary one)")
    args = ap.parse_args()
    methods = args.methods.split(",")
    console = Console(width=230)
    with tempfile.TemporaryDirectory(prefix="bitalloc-quantizers-") as scratch:
        tmp = Path(args.work or scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        for model in args.models.split(","):
            source = "smollm2-135m" if model == "default" else str(offgrid_gguf(tmp))
            table = Table(title=f"quantizers on {model} (SmolLM2-135M{'' if model == 'default' else ' + noise'}): "
                                f"KL on 4 x 512 held-out tokens, {os.cpu_count()} CPUs")
            for col in ("method", "uniform 3b g64", "uniform 3b g128", "uniform 4b g64", "uniform 4b g128",
                        "build levels s", "mixed @3.5 bits", "mixed @4.0 bits", "mixed @4.5 bits", "job s"):
                table.add_column(col, justify="left" if col == "method" else "right")
            rtn = {}
            for method in methods:
                cache = tmp / f"cache-{model}-{method}"
                budgets = [4.5, 5.0] if method == "gguf" else list(BUDGETS)
                front, wall = run_job(source, method, budgets, tmp / f"{model}-{method}", cache)
                uniform = {p["format"]: p["loss"] for p in front["points"] if p["kind"] == "uniform"}
                mixed = {p["label"]: p["loss"] for p in front["points"] if p["kind"] == "mixed"}
                build = sum(v for k, v in front["timings_s"].items() if k.startswith("quantize"))
                suffix = "" if method == "rtn" else f"-{method}"
                names = (["q3_K", None, "q4_K", "q4_0"] if method == "gguf" else
                         [f"w3g64a{suffix}", f"w3g128a{suffix}", f"w4g64a{suffix}", f"w4g128a{suffix}"])
                if method == "rtn":
                    rtn = {3.5: uniform[names[0]], 4.0: uniform[names[2]], 4.5: uniform[names[2]]}
                cells = [f"{'' if method != 'gguf' else n + ' '}{uniform[n]:.4f}" if n in uniform else "-"
                         for n in names]
                ratio = {b: f" ({mixed[f'mixed @ {b:g} bits'] / rtn[b]:.2f}x)"
                         if rtn and f"mixed @ {b:g} bits" in mixed else "" for b in BUDGETS}
                table.add_row(method, *cells, f"{build:.1f}",
                              *[f"{mixed[f'mixed @ {b:g} bits']:.4f}{ratio[b]}" if f"mixed @ {b:g} bits" in mixed
                                else "-" for b in BUDGETS], f"{wall:.0f}")
                Console(stderr=True).print(f"{model} {method}: done in {wall:.0f} s")
            table.caption = ("(Nx): mixed KL over uniform RTN's: w3g64a's (3.5 bits) for @3.5, w4g64a's (4.5 bits) for "
                             "@4.0 and @4.5 (below 1 at @4.0: uniform 4-bit RTN's KL reached at 4.0 bits)")
            console.print(table)


if __name__ == "__main__":
    main()
