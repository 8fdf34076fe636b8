"""Mixture-of-experts models: the share searched, mixed vs uniform KL at the bytes of uniform 3- and 4-bit, a llama.cpp
round trip, and peak memory against the plan with time per stage. Prints two tables.

    .venv/bin/python benchmarks/moe.py [--experts 4,8] [--qwen3-blocks 2] [--work DIR]

Subjects: the default model upcycled (`bitalloc.upcycle`: a Mixtral whose every expert is SmolLM2's MLP with its
channels permuted, seeded router, top-2 gates renormalised — SmolLM2's function exactly, so KL means something), with
each --experts count (`--offgrid`: the same upcycling of the default model moved off its Q4_1 grid,
`bitalloc.offgrid`, where no 4-bit format holds the weights); and a random-init model with Qwen3-30B-A3B's block
shapes (hidden 2048, 128 experts of intermediate 768, top-8, bfloat16, SmolLM2's vocabulary) cut to
--qwen3-blocks blocks, whose quality means nothing and whose memory and time do. Each job is one `bitalloc run` in a
child process (`run.workers: 0`, so its peak resident set is the job's, sampled every 0.1 s: all of it, and its
anonymous part — the plan's scope, as a memory-mapped checkpoint's clean file pages are given back under pressure),
with a fresh level store:
- `rtn`: w2-w8 at group 64, asymmetric (the default job's formats), Fisher, DP, budgets 3.5 / 4.5 bits — the bytes of
  uniform w3g64a and w4g64a, whose KL the same job measures;
- `clip`: the `bitalloc` target's quantizer (clip levels, run by the packed kernels) at the same formats and budgets
  (the target itself refuses MoE models until its packed checkpoint holds expert units);
- `llamacpp`: `formats: {target: llamacpp}`, budgets from the target's smallest point to 8 bits, then `bitalloc
  verify --point N` through llama.cpp for every mixed point (the front's KL against llama.cpp's on the same tokens,
  layers matching byte for byte) and `--presets` once: llama.cpp's presets quantized from the same float GGUF and
  measured by the same llama-perplexity, each against the best verified point of at most its bytes (the token
  embedding kept at the model's dtype in both, as verify quantizes them).
Data: the default job's (4 x 512 calibration, 4 x 512 held-out tokens of shakespeare); the Qwen3 shape runs
1 x 256 of each with w2/w4/w8 and the data-free sqnr estimator.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

DATA = {"source": "shakespeare", "seq_len": 512, "calibration": 4, "evaluation": 4, "batch_size": 2}
JOBS = {
    "rtn": ({"bits": [2, 3, 4, 5, 6, 8], "group_size": 64}, [3.5, 4.5], "w3g64a", "w4g64a"),
    "clip": ({"bits": [2, 3, 4, 5, 6, 8], "group_size": 64, "method": "clip"}, [3.5, 4.5], "w3g64a-clip",
             "w4g64a-clip"),
    "llamacpp": ({"target": "llamacpp"}, [4.0, 4.25, 4.5, 4.75, 5.0, 5.5, 6.0, 7.0, 8.0], "q3_K", "q4_0"),
}


def _status(pid: int) -> tuple[int, int]:
    """(resident, anonymous resident) bytes of a process: its file pages (a memory-mapped checkpoint, read once while
    experts are fused at load) are clean and given back under pressure, its anonymous pages are what the plan
    counts beside the model."""
    fields = dict(l.split(":", 1) for l in open(f"/proc/{pid}/status").read().splitlines() if ":" in l)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["RssAnon"].split()[0]) * 1024


def timed_cli(args: list[str], env: dict) -> tuple[float, tuple[int, int], str]:
    """(seconds, (peak resident, peak anonymous resident) bytes, stderr) of one `bitalloc` command in a child
    process, sampled every 0.1 s."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "bitalloc.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=env)
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(child.stderr), daemon=True)
    reader.start()
    peak = anon = 0
    while child.poll() is None:
        try:
            rss, rss_anon = _status(child.pid)
        except (OSError, KeyError):
            break
        peak, anon = max(peak, rss), max(anon, rss_anon)
        time.sleep(0.1)
    child.wait()
    reader.join()
    wall = time.perf_counter() - start
    text = "".join(said)
    if child.returncode:
        lines = [l for l in text.splitlines() if l.startswith("error")] or text.splitlines()[-3:]
        raise SystemExit(f"bitalloc {' '.join(args[:2])}: {lines}")
    return wall, (peak, anon), text


def run_job(source: str, name: str, formats, budgets, data: dict, estimator: str, out: Path) -> dict:
    """The job's front.json, with its wall time, peak memory and planned memory added (a finished job is read)."""
    record = out.with_suffix(".bench.json")
    if record.is_file():
        return json.loads(record.read_text())
    spec = {"name": name, "model": {"source": source}, "formats": formats, "data": data,
            "sensitivity": {"estimator": estimator}, "search": {"solver": "dp", "budgets": budgets, "points": 0},
            "run": {"workers": 0}, "tracking": {"enabled": False}, "output": str(out)}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "BITALLOC_CACHE": str(out.with_suffix(".cache"))}
    wall, peak, said = timed_cli(["run", str(path), "--fresh"], env)
    front = json.loads((out / "front.json").read_text())
    planned = re.search(r"memory plan: .*?total ([\d.]+ [KMG]iB)", said)
    searched = re.search(r"searching .*?([\d.]+) % of the model", said)
    front["bench"] = {"wall_s": wall, "peak_bytes": peak[0], "peak_anon_bytes": peak[1],
                      "planned": planned[1] if planned else "?",
                      "searched": float(searched[1]) if searched else None, "env": env["BITALLOC_CACHE"]}
    if name == "llamacpp":
        env["BITALLOC_LLAMA_CPP"] = llama_cpp_dir()  # the job's fresh cache, but the tools already built
        mixed = [p for p in front["points"] if p["kind"] == "mixed"]
        peaks = []
        for n in range(1, len(mixed) + 1):
            _, peak, _ = timed_cli(["verify", str(out), "--point", str(n), "--runtime", "llamacpp"]
                                   + (["--presets"] if n == 1 else []), env)
            peaks.append(peak[0])
        verified = json.loads((out / "front.json").read_text())["runtime_points"]
        first = next(r for r in verified if r["kind"] == "point" and r["label"] == mixed[0]["label"])
        front["bench"]["verify"] = {"front_kl": first["bitalloc_loss"], "runtime_kl": first["loss"],
                                    "matching": first["details"]["layers_matching"], "peak_bytes": max(peaks)}
        front["bench"]["runtime_points"] = verified
    record.write_text(json.dumps(front))
    return front


def llama_cpp_dir() -> str:
    """llama.cpp's built tools as the user's cache has them (each job here gets a fresh cache for its levels)."""
    from bitalloc.quantizers.gguf import tools

    return str(tools.build_dir())


def presets_table(experts: int, verified: list[dict]) -> Table:
    """Each llama.cpp preset against the best bitalloc point of at most its bytes, both measured by llama.cpp."""
    points = sorted((r for r in verified if r["kind"] == "point"), key=lambda r: r["bytes"])
    table = Table(title=f"upcycled {experts}x: llama.cpp's presets vs the llama.cpp target's front, both quantized "
                        "by llama-quantize and measured by llama-perplexity (KL on the job's held-out tokens)")
    for col in ("preset", "MiB", "llama.cpp KL", "best bitalloc point at <= its bytes", "MiB", "llama.cpp KL",
                "front KL (its evaluator)", "layers matching", "dominates"):
        table.add_column(col, justify="left" if col.startswith(("preset", "best")) else "right")
    for preset in sorted((r for r in verified if r["kind"] == "preset"), key=lambda r: r["bytes"]):
        best = min((p for p in points if p["bytes"] <= preset["bytes"]), key=lambda p: p["loss"], default=None)
        if best is None:
            table.add_row(preset["label"], f"{preset['mib']:.1f}", f"{preset['loss']:.4f}", "none that small",
                          "", "", "", "", "no")
            continue
        table.add_row(preset["label"], f"{preset['mib']:.1f}", f"{preset['loss']:.4f}", best["label"],
                      f"{best['mib']:.1f}", f"{best['loss']:.4f}", f"{best['bitalloc_loss']:.4f}",
                      f"{int(best['details']['layers_matching'])}", "yes" if best["loss"] <= preset["loss"] else "no")
    return table


def qwen3_shape(folder: Path, blocks: int) -> Path:
    """A random-init Qwen3-MoE with Qwen3-30B-A3B's block shapes, `blocks` blocks, bfloat16."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from bitalloc.model import load_model

    tokenizer = load_model("smollm2-135m").tokenizer
    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=6144,
                            moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                            num_hidden_layers=blocks, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                            max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device("cpu"):
        model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", default="4", help="upcycled expert counts; empty skips them")
    ap.add_argument("--jobs", default="rtn,clip,llamacpp")
    ap.add_argument("--qwen3-blocks", type=int, default=2, help="0 skips the Qwen3-30B-A3B shape")
    ap.add_argument("--offgrid", action="store_true", help="upcycle the default model moved off its Q4_1 grid")
    ap.add_argument("--work", default=None, help="folder for subjects and results (default: a temporary one)")
    args = ap.parse_args()
    console = Console(width=220)
    from bitalloc.offgrid import offgrid_gguf
    from bitalloc.upcycle import write_upcycled

    with tempfile.TemporaryDirectory(prefix="bitalloc-moe-") as scratch:
        work = Path(args.work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        quality = Table(title=f"upcycled SmolLM2-135M{' off its grid' if args.offgrid else ''} (top-2): KL on 4 x 512 "
                              f"held-out tokens, {os.cpu_count()} CPUs")
        for col in ("experts", "job", "searched %", "uniform 3b KL", "mixed at its bytes", "uniform 4b KL",
                    "mixed at its bytes", "verify: front KL / llama.cpp KL, layers matching"):
            quality.add_column(col, justify="left" if col in ("job", "experts") else "right")
        cost = Table(title="memory and time per stage (one process, run.workers: 0)")
        for col in ("subject", "job", "params", "planned", "peak RSS", "peak anon", "stages (s)", "job s"):
            cost.add_column(col, justify="left" if col in ("subject", "job", "stages (s)") else "right")
        tables = []
        dense = str(offgrid_gguf(work)) if args.offgrid else "smollm2-135m"
        tag = "offgrid-" if args.offgrid else ""
        for experts in [int(e) for e in args.experts.split(",") if e]:
            subject = work / f"smollm2-{tag}upcycled-{experts}x"
            if not (subject / "config.json").is_file():
                write_upcycled(dense, subject, experts=experts)
            for name in args.jobs.split(","):
                formats, budgets, u3, u4 = JOBS[name]
                front = run_job(str(subject), name, formats, budgets, DATA, "fisher",
                                work / f"{tag}{experts}x-{name}")
                uniform = {p["format"]: p for p in front["points"] if p["kind"] == "uniform"}
                mixed = [p for p in front["points"] if p["kind"] == "mixed"]

                def at(u):
                    if u not in uniform:
                        return "-", "-"
                    best = min((p for p in mixed if p["bytes"] <= uniform[u]["bytes"]), key=lambda p: p["loss"],
                               default=None)
                    ratio = f"{best['loss']:.4f} ({best['loss'] / uniform[u]['loss']:.2f}x)" if best else "-"
                    return f"{uniform[u]['loss']:.4f}", ratio

                b = front["bench"]
                v = b.get("verify")
                check = f"{v['front_kl']:.4f} / {v['runtime_kl']:.4f}, {int(v['matching'])}" if v else ""
                quality.add_row(str(experts), name, f"{b['searched']}", *at(u3), *at(u4), check)
                stages = ", ".join(f"{k} {s:.0f}" for k, s in front["timings_s"].items() if s >= 1)
                cost.add_row(f"upcycled {experts}x", name, f"{front['model']['quantized_params'] / 1e6:.0f} M",
                             b["planned"], _gib(b["peak_bytes"]), _gib(b.get("peak_anon_bytes", 0)), stages,
                             f"{b['wall_s']:.0f}")
                if "runtime_points" in b:
                    tables.append(presets_table(experts, b["runtime_points"]))
                Console(stderr=True).print(f"{experts}x {name}: done in {b['wall_s']:.0f} s")
        if args.qwen3_blocks:
            subject = qwen3_shape(work / f"qwen3-30b-a3b-shape-{args.qwen3_blocks}b", args.qwen3_blocks)
            data = dict(DATA, seq_len=256, calibration=1, evaluation=1)
            front = run_job(str(subject), "qwen3", {"bits": [2, 4, 8], "group_size": 64}, [4.0], data, "sqnr",
                            work / "qwen3-shape")
            b = front["bench"]
            stages = ", ".join(f"{k} {s:.0f}" for k, s in front["timings_s"].items() if s >= 1)
            cost.add_row(f"Qwen3-30B-A3B shape, {args.qwen3_blocks} blocks", "w2/w4/w8, sqnr",
                         f"{front['model']['quantized_params'] / 1e6:.0f} M", b["planned"], _gib(b["peak_bytes"]),
                         _gib(b.get("peak_anon_bytes", 0)),
                         stages, f"{b['wall_s']:.0f}")
        for table in (quality, *tables, cost):
            console.print(table)


if __name__ == "__main__":
    main()
