"""llama.cpp's presets against the llama.cpp target's front, compared as users compare them: the size of the GGUF file
and the KL llama.cpp itself measures, with and without an importance matrix. Prints one table per model.

    .venv/bin/python benchmarks/presets.py [--models default,offgrid] [--imatrix both|no|yes] [--work DIR]

Models: `default` is SmolLM2-135M (its weights on the Q4_1 grid it ships in); `offgrid` the same model with seeded
noise on every block weight and the token embedding (`bitalloc.offgrid`), which no 4-bit grid holds. For each model
and importance-matrix setting: a probe job (`jobs/examples/smollm2-llamacpp.yaml`, one point) verified with
`--presets` measures every preset (llama-quantize from the job's float GGUF, with the job's importance matrix when it
has one; llama-perplexity on the job's held-out windows); then the same job with each preset's file size as a
budget (levels and sensitivity come from the probe's caches) has every mixed point verified. Each preset is set
against the best verified point whose file is no larger. Bytes are files' sizes: the front's prediction is checked
against the file llama-quantize wrote for each point. Jobs keep their results in --work; finished steps are read.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from bitalloc.offgrid import offgrid_gguf
from bitalloc.results import read_front

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "bitalloc.cli", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"bitalloc {' '.join(args)}: {(done.stderr.strip().splitlines() or ['?'])[-1]}")


def run(source: str, imatrix: bool, budgets: list, out: Path, presets: bool = False) -> None:
    """The example llama.cpp job on `source` at `budgets`, every mixed point verified (with `presets`, the presets
    with the first)."""
    if not (out / "front.json").is_file():
        spec = yaml.safe_load((ROOT / "jobs" / "examples" / "smollm2-llamacpp.yaml").read_text())
        spec.update(name=out.name, output=str(out), tracking={"enabled": False})
        spec["model"]["source"] = source
        spec["formats"]["params"] = {"imatrix": imatrix}
        spec["search"].update(budgets=budgets, points=0)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".yaml").write_text(yaml.safe_dump(spec))
        cli("run", str(out.with_suffix(".yaml")), "--workers", "0")
    front = read_front(out / "front.json")
    done = {r.label for r in front.runtime_points}
    for n, point in enumerate(front.mixed, 1):
        if point.label not in done:
            cli("verify", str(out), "--point", str(n), "--runtime", "llamacpp",
                *(["--presets"] if presets and not any(r.kind == "preset" for r in front.runtime_points) else []))


def embedding_share(r) -> str:
    return f"{r.details['embedding_bytes'] / r.bytes:.1%}" if "embedding_bytes" in r.details else "-"


def compare(model: str, imatrix: bool, work: Path, console: Console) -> None:
    source = "smollm2-135m" if model == "default" else str(offgrid_gguf(work))
    tag = f"{model}-{'imatrix' if imatrix else 'plain'}"
    probe = work / f"{tag}-probe"
    run(source, imatrix, [5.0], probe, presets=True)
    measured = read_front(probe / "front.json")
    presets = sorted((r for r in measured.runtime_points if r.kind == "preset"), key=lambda r: r.bytes)
    # each preset's size as a budget, within what the front spans (a preset above its dearest gets the dearest)
    cheapest, dearest = min(measured.proxy_front.bytes), max(p.bytes for p in measured.uniform)
    budgets = sorted({f"{min(r.bytes, dearest)}B" for r in presets if r.bytes >= cheapest}, key=lambda b: int(b[:-1]))
    out = work / tag
    run(source, imatrix, budgets, out)
    front = read_front(out / "front.json")
    built = [r for r in front.runtime_points if r.kind == "point"]
    table = Table(title=f"{model} ({source}), {'with' if imatrix else 'without'} an importance matrix: llama.cpp's "
                        f"presets vs the front, file bytes and llama.cpp's KL on {measured.reference.tokens} "
                        f"held-out tokens ({os.cpu_count()} CPUs)")
    for col in ("preset", "file MiB", "KL", "embedding share", "best point at <= its bytes", "file MiB", "KL",
                "front KL (its evaluator)", "embedding share", "front - file bytes", "layers matching", "dominated"):
        table.add_column(col, justify="left" if col in ("preset", "best point at <= its bytes") else "right")
    for r in presets:
        best = min((b for b in built if b.bytes <= r.bytes), key=lambda b: b.loss, default=None)
        if best is None:
            table.add_row(r.label, f"{r.mib:.2f}", f"{r.loss:.4f}", embedding_share(r), "none (below the cheapest)",
                          *["-"] * 6, "-")
            continue
        point = next(p for p in front.mixed if p.config == best.config)
        table.add_row(r.label, f"{r.mib:.2f}", f"{r.loss:.4f}", embedding_share(r), best.label, f"{best.mib:.2f}",
                      f"{best.loss:.4f}", f"{point.loss:.4f}", embedding_share(best),
                      f"{point.bytes - best.file_bytes:+,}", f"{best.details.get('layers_matching', 0):.0f}",
                      "yes" if best.loss < r.loss else "NO")
    console.print(table)
    console.print(json.dumps({"model": model, "imatrix": imatrix, "job_s": round(sum(front.timings_s.values()), 1),
                              "probe_job_s": round(sum(measured.timings_s.values()), 1)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="default,offgrid")
    ap.add_argument("--imatrix", choices=("both", "no", "yes"), default="both")
    ap.add_argument("--work", default="runs/presets-benchmark")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    console = Console(width=240)
    settings = {"both": (False, True), "no": (False,), "yes": (True,)}[args.imatrix]
    for model in args.models.split(","):
        for imatrix in settings:
            compare(model, imatrix, work, console)


if __name__ == "__main__":
    main()
