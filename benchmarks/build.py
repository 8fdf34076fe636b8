"""`bitalloc build` per runtime, measured as a user meets it: the time to write the artifact from the job's levels,
its size on disk against the front's bytes (a folder's model card aside), the time the runtime's own loader takes to
load it, the KL the runtime's weights give against the front's, and how many layers hold bitalloc's levels; beside
it, the time the runtime's own quantization of the same point takes (llama-quantize of the exported types;
llm-compressor's, GPTQModel's and HQQ's own quantize from the exported recipe, `verify --recipe`). Prints one table
per model.

    .venv/bin/python benchmarks/build.py [--models default,offgrid,1b,moe] [--work DIR]
                                         [--runtimes llamacpp,llmcompressor,gptqmodel,hqq,bitalloc]

One job per model and runtime (`jobs/examples/smollm2.yaml`'s data and estimator, `formats.target` the runtime, one
budget of 4.5 average bits); its first mixed point is built, loaded and verified. Needs `.venv-runtimes` for the
Python runtimes (`./dev test` builds it) and llama.cpp's tools (built on first use). Finished jobs are read from
--work. `1b` is a random-init Llama-3.2-1B shape (float32, SmolLM2's tokenizer) with small jobs of two or three
formats of each runtime's kind (llama.cpp, llm-compressor's rtn-int, bitalloc's rtn): only its build time and size are
measured. `moe` is the default model upcycled into a 4-expert Mixtral (`bitalloc.upcycle`, SmolLM2's function
exactly), built for the runtimes whose artifacts hold expert units (llama.cpp; llm-compressor with rtn-int levels;
GPTQModel with GPTQ's, each expert against its routed tokens; bitalloc's packed checkpoint with clip's), without the
runtime's own quantize beside it.
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
from bitalloc.results import read_front
from llamacpp_evaluator import one_b  # the random-init Llama-3.2-1B shape, saved once

ROOT = Path(__file__).resolve().parent.parent
RUNTIMES_PYTHON = os.environ.get("BITALLOC_RUNTIMES_PYTHON") or str(ROOT / ".venv-runtimes" / "bin" / "python")


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        said = done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["?"]
        raise SystemExit(f"{' '.join(args[:4])} ...: {said[-1]}")
    return time.perf_counter() - start


def cli(*args: str) -> float:
    return timed([sys.executable, "-m", "bitalloc.cli", *args])


# the 1B shape's jobs: two or three formats each, the runtime's own kind, a data-free estimator and little data (the
# build is what is timed; its KL means nothing on random weights)
ONE_B_FORMATS = {"llamacpp": {"types": ["q4_K", "q6_K", "q8_0"]},
                 "llmcompressor": {"target": "llmcompressor", "method": "rtn-int"},  # its folder's bytes
                 "bitalloc": {"bits": [4, 8], "group_size": 128, "method": "rtn"}}


# the runtimes whose artifacts hold mixture-of-experts units, and their formats on the MoE (llm-compressor's rtn-int,
# GPTQModel's GPTQ, its only method; bitalloc's clip)
MOE_FORMATS = {"llamacpp": {"target": "llamacpp"}, "llmcompressor": {"target": "llmcompressor", "method": "rtn-int"},
               "gptqmodel": {"target": "gptqmodel"}, "bitalloc": {"target": "bitalloc"}}


def upcycled(folder: Path) -> Path:
    """The default model upcycled into a 4-expert Mixtral computing its function (`bitalloc.upcycle`), saved once."""
    from bitalloc.upcycle import write_upcycled

    if not (folder / "config.json").is_file():
        write_upcycled("smollm2-135m", folder, experts=4)
    return folder


def job(source: str, runtime: str, out: Path, one_b: bool = False, moe: bool = False) -> None:
    if (out / "front.json").is_file():
        return
    spec = yaml.safe_load((ROOT / "jobs" / "examples" / "smollm2.yaml").read_text())
    spec.update(name=out.name, output=str(out), tracking={"enabled": False})
    spec["model"]["source"] = source
    spec["formats"] = MOE_FORMATS[runtime] if moe else {"target": runtime}
    spec["search"].update(budgets=[4.5], points=0)
    if one_b:
        spec["formats"] = ONE_B_FORMATS[runtime]
        spec["data"].update(seq_len=256, calibration=2, evaluation=2)
        spec["sensitivity"] = {"estimator": "sqnr"}
        spec["search"].update(budgets=[5.0])
        spec["model"]["embeddings"] = runtime == "llamacpp"  # where the runtime stores it quantized, as its target
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".yaml").write_text(yaml.safe_dump(spec))
    cli("run", str(out.with_suffix(".yaml")), "--workers", "0")


def load_seconds(runtime: str, artifact: Path) -> float | None:
    """The runtime's own loader on the artifact (llama.cpp: `llama-cli`'s model load is inside llama-perplexity's
    run in verify, not timed apart here)."""
    if runtime in ("llmcompressor", "gptqmodel", "hqq"):
        with tempfile.TemporaryDirectory() as tmp:
            return timed([RUNTIMES_PYTHON, str(ROOT / "runtimes" / "venv.py"), "load", runtime, str(artifact), tmp])
    if runtime == "bitalloc":
        return timed([sys.executable, "-c", f"import bitalloc; bitalloc.load_packed({str(artifact)!r})"])
    return None


def own_quantize_seconds(runtime: str, out: Path) -> float | None:
    """The runtime quantizing the same point itself from bitalloc's recipe (build and measure, as `verify --recipe`
    runs it; llama.cpp: verify's llama-quantize of the exported types runs inside its verify)."""
    if runtime in ("llmcompressor", "gptqmodel", "hqq"):
        try:
            return cli("verify", str(out), "--point", "1", "--runtime", runtime, "--recipe")
        except SystemExit as exc:
            print(f"{runtime} --recipe: {exc}")
    return None


def bench(model: str, source: str, runtimes: list[str], work: Path, console: Console) -> None:
    table = Table("runtime", "build s", "artifact MiB", "front MiB", "front - artifact bytes", "load s", "runtime KL",
                  "front KL", "KL diff", "layers matching", "runtime's own quantize s",
                  title=f"bitalloc build on {model} ({5.0 if model == '1b' else 4.5} average bits, 2 cores)")
    for runtime in runtimes:
        out = work / model / runtime
        job(source, runtime, out, one_b=model == "1b", moe=model == "moe")
        suffix = ".gguf" if runtime == "llamacpp" else ""
        artifact = work / model / f"{runtime}-artifact{suffix}"
        build_s = cli("build", str(out), "--point", "1", "--runtime", runtime, "-o", str(artifact), "--force")
        # a folder's model card (README.md) aside, as the front counts it; a GGUF's card keys are inside the file
        size = artifact.stat().st_size if artifact.is_file() else sum(f.stat().st_size for f in artifact.rglob("*")
                                                                         if f.is_file() and f.name != "README.md")
        front = read_front(out / "front.json")
        point = front.mixed[0]
        if model == "1b":  # the build's time and size only: loading and measuring random weights says nothing here
            table.add_row(runtime, f"{build_s:.1f}", f"{size / 2**20:.2f}", f"{point.bytes / 2**20:.2f}",
                          f"{point.bytes - size:+,}", *["-"] * 6)
            continue
        load_s = load_seconds(runtime, artifact)
        own = None if model == "moe" else own_quantize_seconds(runtime, out)
        cli("verify", str(out), "--point", "1", "--runtime", runtime)
        front = read_front(out / "front.json")
        (measured,) = [r for r in front.runtime_points if r.label == point.label]
        quantized = sum(1 for f in json.loads((out / point.config).read_text())["layers"].values() if f["bits"] != 16)
        matching = measured.details.get("layers_matching", measured.details.get("recipe_tensors_matching"))
        table.add_row(runtime, f"{build_s:.1f}", f"{size / 2**20:.2f}", f"{point.bytes / 2**20:.2f}",
                      f"{point.bytes - size:+,}", "-" if load_s is None else f"{load_s:.1f}",
                      f"{measured.loss:.5f}", f"{point.loss:.5f}", f"{measured.loss / point.loss - 1:+.2%}",
                      f"{matching:.0f} / {quantized}", "-" if own is None else f"{own:.0f}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="default")
    parser.add_argument("--runtimes", default="llamacpp,llmcompressor,gptqmodel,hqq,bitalloc")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-build")
    args = parser.parse_args()
    console = Console(width=200)
    for model in args.models.split(","):
        source = {"default": lambda: "smollm2-135m", "offgrid": lambda: str(offgrid_gguf(args.work / "models")),
                  "1b": lambda: str(one_b(args.work / "models" / "llama-1b")),
                  "moe": lambda: str(upcycled(args.work / "models" / "smollm2-upcycled-4x"))}[model]()
        keep = {"1b": ONE_B_FORMATS, "moe": MOE_FORMATS}.get(model)
        runtimes = [r for r in args.runtimes.split(",") if keep is None or r in keep]
        bench(model, source, runtimes, args.work, console)


if __name__ == "__main__":
    main()
