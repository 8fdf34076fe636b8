"""Round trips through the runtimes: every mixed point of a job built by the runtime that can build it and measured
there, against bitalloc's measured KL and counted bytes; llama.cpp's presets measured the same way. Prints two tables.

    .venv/bin/python benchmarks/verify.py [--work DIR]

Jobs (run into --work unless already there, with a store in --work/mlflow.db): `jobs/examples/smollm2-llamacpp.yaml`
(the llama.cpp target, with budgets just under each preset's average bits: every point verified with
`--runtime llamacpp`, presets once); the same with an importance matrix (`imatrix: true`, which adds the i-quants
below 4 bits: two points); the default job's model and data searched for llm-compressor (its GPTQ, `gptq-ct`, with
`act_order`: two points, verified with `--runtime llmcompressor`) and for HQQ (two points, `--runtime hqq`); and the
default job
`jobs/examples/smollm2.yaml` (min-max RTN, which no runtime stores: its budget points verified with
`--runtime llamacpp --nearest`, to show what the nearest export builds instead).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bitalloc.results import read_front

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "bitalloc.cli", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"bitalloc {' '.join(args)}: {(done.stderr.strip().splitlines() or ['?'])[-1]}")


# just under the average bits of llama.cpp's presets on SmolLM2-135M (Q2_K and Q3_K_S coincide: most rows are 576
# wide and fall back to 32-blocks), so the front has a point at no more bytes than each
PRESET_BITS = "[4.233, 4.5, 4.633, 5.533, 6.034, 8.015, 8.499]"


def job(example: str, out: Path, store: str, *overrides: str) -> dict:
    if not (out / "front.json").is_file():
        cli("run", str(ROOT / "jobs" / "examples" / example), "--out", str(out), "--workers", "0",
            "--tracking-uri", store, *[arg for o in overrides for arg in ("--set", o)])
    return json.loads((out / "front.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="runs/verify-benchmark")
    work = Path(ap.parse_args().work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{work / 'mlflow.db'}"
    # (example, folder, runtime, --nearest, --presets, overrides)
    plans = [("smollm2-llamacpp.yaml", work / "llamacpp", "llamacpp", False, True,
              (f"search.budgets={PRESET_BITS}", "search.points=2")),
             ("smollm2-llamacpp.yaml", work / "llamacpp-imatrix", "llamacpp", False, False,
              ("name=smollm2-llamacpp-imatrix", "formats.params.imatrix=true", "search.budgets=[3.9, 4.5]",
               "search.points=0")),
             ("smollm2.yaml", work / "llmcompressor", "llmcompressor", False, False,
              ("name=smollm2-llmcompressor", "formats={target: llmcompressor, params: {act_order: true}}",
               "search.budgets=[4.5, 5.0]", "search.points=0")),
             ("smollm2.yaml", work / "hqq", "hqq", False, False,
              ("name=smollm2-hqq", "formats={target: hqq}", "search.budgets=[3.5, 4.5]", "search.points=0")),
             ("smollm2.yaml", work / "default", "llamacpp", True, False, ())]
    console = Console(width=200)
    table = Table(title=f"bitalloc verify on SmolLM2-135M (held-out 4 x 512 tokens, KL over the positions "
                        f"llama-perplexity scores; {os.cpu_count()} CPUs)")
    for col in ("job", "point", "runtime", "avg bits", "bitalloc KL", "runtime KL", "difference", "counted layer B",
                "stored layer B", "bytes diff", "layers matching", "llama.cpp's own arithmetic KL"):
        table.add_column(col, justify="left" if col in ("job", "point", "runtime") else "right")
    presets = Table(title="llama.cpp's presets measured by llama.cpp on the same tokens, against the llama.cpp-target "
                          "front as llama.cpp builds it")
    for col in ("preset", "MiB", "preset KL", "front point at no more bytes", "its MiB", "its KL (llama.cpp)",
                "dominated"):
        presets.add_column(col, justify="left" if col in ("preset", "front point at no more bytes") else "right")
    for example, out, runtime, nearest, with_presets, overrides in plans:
        front = job(example, out, store, *overrides)
        mixed = sorted((p for p in front["points"] if p["kind"] == "mixed"), key=lambda p: p["bytes"])
        chosen = [i + 1 for i, p in enumerate(mixed) if "@" in p["label"]] if nearest else range(1, len(mixed) + 1)
        done = {r["label"] for r in front.get("runtime_points", [])}
        for n in chosen:
            label = mixed[n - 1]["label"] + (" (nearest)" if nearest else "")
            if label not in done:
                cli("verify", str(out), "--point", str(n), "--runtime", runtime,
                    *(["--nearest"] if nearest else []),
                    *(["--presets"] if n == chosen[-1] and with_presets and not any(
                        r["kind"] == "preset" for r in front.get("runtime_points", [])) else []))
        points = read_front(out / "front.json").runtime_points
        bits = {p["config"]: p["avg_bits"] for p in mixed}
        built = sorted((r for r in points if r.kind == "point"), key=lambda r: r.bytes)
        for r in built:
            quantized = sum(f["bits"] != 16 for f in json.loads((out / r.config).read_text())["layers"].values())
            matching = f"{r.details['layers_matching']:.0f}/{quantized}" if "layers_matching" in r.details else "-"
            diff = (f"{r.loss_rel_diff:+.1%}" if r.loss_rel_diff is not None
                    else f"{r.loss - r.bitalloc_loss:+.1e} (abs)")
            table.add_row(front["job"]["name"], r.label, r.runtime, f"{bits[r.config]:.3f}", f"{r.bitalloc_loss:.4f}",
                          f"{r.loss:.4f}", diff, f"{r.counted_layer_bytes:,}", f"{r.stored_layer_bytes:,}",
                          f"{r.bytes_rel_diff:+.2%}", matching,
                          f"{r.details.get('vs_bitalloc_kl', float('nan')):.4f}")
        for r in sorted((r for r in points if r.kind == "preset"), key=lambda r: r.bytes):
            best = min((b for b in built if b.bytes <= r.bytes), key=lambda b: b.loss, default=None)
            presets.add_row(r.label, f"{r.mib:.2f}", f"{r.loss:.4f}", best.label if best else "-",
                            f"{best.mib:.2f}" if best else "-", f"{best.loss:.4f}" if best else "-",
                            "yes" if best and best.loss < r.loss else "NO")
    console.print(table)
    console.print(presets)


if __name__ == "__main__":
    main()
