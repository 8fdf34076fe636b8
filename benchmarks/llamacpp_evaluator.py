"""The llama.cpp evaluation backend against bitalloc's torch evaluator on the same candidates, and against
llama-perplexity's own run of the same files on the same tokens; then a whole llama.cpp-target job measured by each.

    .venv/bin/python benchmarks/llamacpp_evaluator.py [--subjects default,offgrid,1b] [--jobs default,offgrid]
                                                      [--work DIR]

Subjects: `default` is SmolLM2-135M, `offgrid` the same function off its Q4_1 grid (`bitalloc.offgrid`), `1b` a
random-init Llama-3.2-1B shape (SmolLM2's vocabulary, float32, built in code: its KLs mean nothing, its times do).
Each is opened with the example llama.cpp job's settings (`jobs/examples/smollm2-llamacpp.yaml`: 4 x 512 held-out
tokens; for 1b only q4_K, q6_K and q8_0, as every type's levels would take an hour there, and 2 windows) and four
candidates (uniform at three types, one mix) are measured on the held-out windows by
- the torch evaluator, as a job runs it (every position of each window);
- the llama.cpp backend (the candidate's GGUF assembled from the levels, loaded by libllama, positions n/2 … n−2);
- `llama-perplexity --kl-divergence` on the same GGUF against a base file of the same windows and reference (its time
  includes its process start and model load: what one candidate costs through the tool).
Per candidate: the best of two runs' seconds and window tokens per second of each (after one untimed candidate: the
backend finds each layer's row order once), the backend's KL and the tool's, their difference.
Jobs: the example job on the model, run with `search.evaluator: torch` and then `llamacpp` (the second reuses the
first's levels and sensitivity table), every mixed point then verified by llama-perplexity: the measure stage's
seconds, the whole job's, and the largest |front − verify| over the points.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "jobs" / "examples" / "smollm2-llamacpp.yaml"
ONE_B = (2048, 8192, 16, 32, 8, 49152)  # Llama-3.2-1B: hidden, intermediate, blocks, heads, kv heads; SmolLM2's vocab


def one_b(folder: Path) -> Path:
    """A random-init Llama-3.2-1B shape with SmolLM2's tokenizer, saved once in `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bitalloc.model import load_model

    if (folder / "config.json").is_file():
        return folder
    hidden, inter, blocks, heads, kv, vocab = ONE_B
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=blocks,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=2048, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    load_model("smollm2-135m").tokenizer.save_pretrained(folder)
    return folder


def source(subject: str, work: Path) -> str:
    from bitalloc.offgrid import offgrid_gguf

    return {"default": lambda: "smollm2-135m", "offgrid": lambda: str(offgrid_gguf(work)),
            "1b": lambda: str(one_b(work / "llama-1b"))}[subject]()


def workspace(subject: str, work: Path):
    from bitalloc.jobs.runner import open_workspace
    from bitalloc.jobs.spec import JobSpec
    from bitalloc.progress import Stages

    spec = yaml.safe_load(EXAMPLE.read_text())
    spec["model"]["source"] = source(subject, work)
    if subject == "1b":
        spec["formats"] = {"method": "gguf", "types": ["q4_K", "q6_K", "q8_0"]}
        spec["data"].update(evaluation=2, calibration=1)
    return open_workspace(JobSpec.model_validate(spec), Stages())


def candidates(ws) -> list[tuple[str, dict]]:
    """Uniform configs at three types (each layer at the type where its rows take it, else its job stand-in) and one
    mix: the cheapest type on attention, the dearest elsewhere."""
    from bitalloc.formats import substitute

    def fit(fmt, layer):
        return fmt if fmt.fits(layer.in_features) else substitute(fmt, layer.in_features, ws.formats)

    by_name = {f.name: f for f in ws.formats}
    picks = [n for n in ("q4_0", "q4_K", "q6_K", "q8_0") if n in by_name][-3:]
    out = [(f"uniform {n}", {l.name: fit(by_name[n], l) for l in ws.layers}) for n in picks]
    low, high = by_name[picks[0]], by_name[picks[-1]]
    out.append((f"mix {picks[0]}/{picks[-1]}", {l.name: fit(low if "attn" in l.name else high, l)
                                                 for l in ws.layers}))
    return out


def timed(fn, repeats: int = 1):
    """fn's value and its best wall time over `repeats` runs."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return value, best


def compare(subject: str, work: Path, console: Console) -> None:
    from bitalloc.runtimes.llamacpp.evaluator import LlamaCppRunner
    from bitalloc.runtimes.llamacpp.measure import perplexity, write_base
    from bitalloc.tasks import EvalTask

    ws = workspace(subject, work)
    threads = os.cpu_count() or 1
    torch_runner = ws.local_runner()
    llama = LlamaCppRunner(ws.model, ws.levels, ws.token_sets(), ws.batch_size, threads)
    _, torch_ref_s = timed(lambda: torch_runner.evaluator("evaluation"))
    ref, llama_ref_s = timed(lambda: llama.reference("evaluation"))
    window_tokens = ref.windows.numel()
    table = Table(title=f"{subject} ({ws.source}): {ref.windows.shape[0]} windows x {ref.windows.shape[1]} tokens, "
                        f"{threads} threads; FP references: torch {torch_ref_s:.1f} s, llama.cpp backend's "
                        f"{llama_ref_s:.1f} s (torch forward on the scored positions)")
    for col in ("candidate", "torch s", "torch tok/s", "torch KL (all positions)", "llama.cpp backend s",
                "backend tok/s", "backend KL", "llama-perplexity s", "llama-perplexity KL", "backend - tool",
                "speed-up vs torch", "backend / tool time"):
        table.add_column(col, justify="left" if col == "candidate" else "right")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base.kld"
        write_base(base, ref.windows, ref.logprobs, scored=True)
        tried = candidates(ws)
        llama.run(EvalTask.config(tried[-1][1], "evaluation"))  # once untimed: each layer's row order is found once
        for label, formats in tried:
            task = EvalTask.config(formats, "evaluation")
            ours, torch_s = timed(lambda: torch_runner.run(task), 2)
            backend, backend_s = timed(lambda: llama.run(task), 2)
            path = llama.candidate_file(dict(task.assignment))
            (tool_kl, _), tool_s = timed(lambda: perplexity(path, base, ref.windows.shape[1]), 2)
            path.unlink()
            table.add_row(label, f"{torch_s:.2f}", f"{window_tokens / torch_s:.0f}", f"{ours.loss:.5f}",
                          f"{backend_s:.2f}", f"{window_tokens / backend_s:.0f}", f"{backend.loss:.6f}",
                          f"{tool_s:.2f}", f"{tool_kl:.6f}", f"{(backend.loss - tool_kl) / tool_kl:+.3%}",
                          f"{torch_s / backend_s:.2f}x", f"{backend_s / tool_s:.2f}x")
    console.print(table)


def job(subject: str, work: Path, console: Console) -> None:
    """The example job with each evaluator (levels and table shared), every mixed point verified."""
    from bitalloc.results import read_front

    rows = []
    for evaluator in ("torch", "llamacpp"):
        out = work / f"job-{subject}-{evaluator}"
        if not (out / "front.json").is_file():
            spec = yaml.safe_load(EXAMPLE.read_text())
            spec.update(name=out.name, output=str(out), tracking={"enabled": False})
            spec["model"]["source"] = source(subject, work)
            spec["search"]["evaluator"] = evaluator
            path = work / f"{out.name}.yaml"
            path.write_text(yaml.safe_dump(spec))
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "bitalloc.cli", "run", str(path), "--workers", "0"],
                                  capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{out.name}: {done.stderr.strip().splitlines()[-1:]}")
            (out / "wall_s.txt").write_text(f"{time.perf_counter() - start:.1f}")
        front = read_front(out / "front.json")
        verified = {r.label for r in front.runtime_points}
        for n, point in enumerate(front.mixed, 1):
            if point.label not in verified:
                subprocess.run([sys.executable, "-m", "bitalloc.cli", "verify", str(out), "--point", str(n),
                                "--runtime", "llamacpp"], capture_output=True, text=True, check=True)
        front = read_front(out / "front.json")
        points = {p.config: p for p in front.mixed}
        gaps = [(r.loss - points[r.config].loss) / r.loss for r in front.runtime_points if r.kind == "point"]
        rows.append((evaluator, front.timings_s.get("measure configs", 0.0), (out / "wall_s.txt").read_text(),
                     len(front.points), max(gaps, key=abs)))
    table = Table(title=f"{subject}: the example llama.cpp-target job with each evaluator ({os.cpu_count()} CPUs; "
                        f"the torch job made the levels and the table, the llamacpp job reused them)")
    for col in ("evaluator", "measure s", "job wall s", "points measured", "largest (verify - front) / verify"):
        table.add_column(col, justify="right")
    for evaluator, measure_s, wall, points, gap in rows:
        table.add_row(evaluator, f"{measure_s:.1f}", wall, str(points), f"{gap:+.3%}")
    console.print(table)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", default="default,offgrid,1b")
    ap.add_argument("--jobs", default="default")
    ap.add_argument("--work", default="runs/llamacpp-evaluator-benchmark")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    console = Console(width=240)
    for subject in filter(None, args.subjects.split(",")):
        compare(subject, work, console)
    for subject in filter(None, args.jobs.split(",")):
        job(subject, work, console)


if __name__ == "__main__":
    main()
