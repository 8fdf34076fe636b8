"""`bitalloc verify`: build a measured point the way its runtime builds it from the exported file, with the runtime's
own code, run it on the job's held-out tokens, and put what it gives (loss, quality, the bytes its file stores) beside
what the front promised. Results go into front.json (`runtime_points`), the front plot, and the job's MLflow run (a
child run per runtime and point).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from rich.console import Console

from bitalloc import configio
from bitalloc.errors import BitallocError
from bitalloc.evaluate import Evaluator, model_output
from bitalloc.formats import weight_bytes
from bitalloc.gguf_levels import tensor_names
from bitalloc.pipeline import Workspace
from bitalloc.progress import Stages
from bitalloc.results import ConfigDoc, Front, Point, RuntimePoint, read_config, read_front
from bitalloc.units import mib

from . import verify_llamacpp as llama
from .export import _check_front, _pick, check_avg_bits, layers_of, run_store, verified
from .runtimes import export, ggml_type

PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")


@dataclass
class Picked:
    """The point to verify, its config, and the job it belongs to."""

    folder: Path
    front: Front
    point: Point
    config: ConfigDoc


@contextmanager
def job_folder(target: str, tracking_uri: Optional[str]) -> Iterator[Path]:
    """The job's result folder: TARGET itself, or its MLflow run's `results` artifacts fetched to a temporary one."""
    path = Path(target)
    if path.is_dir():
        if not (path / "front.json").is_file():
            raise BitallocError("TARGET", f"{target!r} holds no front.json; give a job's output dir or run id")
        yield path
        return
    uri = run_store(target, tracking_uri)
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from bitalloc.dashboards.tracking import KIND_TAG, client

    try:
        run = client(uri).get_run(target)
    except MlflowException:
        raise BitallocError("TARGET", f"no MLflow run {target} in {uri}") from None
    if run.data.tags.get(KIND_TAG) != "job":
        raise BitallocError("TARGET", f"MLflow run {target} is not a bitalloc job's run; give the job's run id")
    with tempfile.TemporaryDirectory(prefix="bitalloc-verify-") as tmp:
        try:
            folder = Path(download_artifacts(run_id=target, artifact_path="results", dst_path=tmp, tracking_uri=uri))
        except (MlflowException, OSError):
            raise BitallocError("TARGET", f"MLflow run {target} has no results (did the job finish?)") from None
        yield folder


def pick(folder: Path, avg_bits, budget, point) -> Picked:
    front = read_front(folder / "front.json")
    _check_front(front, str(folder))
    chosen = _pick(front, avg_bits, budget, point)
    doc = verified(read_config(folder / chosen.config), front.model, str(folder / chosen.config))
    if not (folder / "spec.yaml").is_file():
        raise BitallocError("TARGET", f"{folder} has no spec.yaml (an older result); rerun the job to verify it")
    return Picked(folder, front, chosen, doc)


class Measured:
    """bitalloc's own log-probabilities on a set of windows: the float32 model's (kept) and a config's."""

    def __init__(self, ws: Workspace, tokens: torch.Tensor):
        self.ws = ws
        self.evaluator = Evaluator(ws.model, ws.levels, tokens, ws.batch_size)
        self.reference = [lp for batch in self.evaluator.reference for lp in batch]

    @torch.no_grad()
    def config(self, doc: ConfigDoc) -> list[torch.Tensor]:
        with self.evaluator.streamed(doc.formats()):
            return [lp for batch in self.evaluator.batches for lp in model_output(self.ws.model, batch)]


def files_sha256(files: list[Path]) -> str:
    """sha256 over the files' bytes in order (a runtime's checkpoint may be several files), read in chunks."""
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# runtime -> build(workspace, point, exported file text, work folder, presets, stages): the runtime's model measured
RUNTIMES: dict[str, Callable[..., list[RuntimePoint]]] = {}


def verify_llamacpp(ws: Workspace, picked: Picked, text: str, work: Path, presets: bool,
                    stages: Stages) -> list[RuntimePoint]:
    doc = picked.config
    with stages.stage("float GGUF"):
        float_file = llama.float_gguf(ws, llama.llamacpp.cache_base() / "verify")
    tokens = llama.windows(ws, float_file)
    n_ctx = tokens.shape[1]
    with stages.stage("bitalloc's log-probabilities", 2):
        measured = Measured(ws, tokens)
        quantized = measured.config(doc)
    base, ours = work / "base-fp.kld", work / "base-bitalloc.kld"
    llama.write_base(base, tokens, measured.reference)
    llama.write_base(ours, tokens, quantized)
    bitalloc_kl, _ = llama.same_positions(measured.reference, quantized, tokens)
    names = tensor_names(doc.model.type, list(doc.layers), "--runtime")
    other = picked.front.model.other_bytes
    types_file = work / "types.txt"
    types_file.write_text(text)
    matrix = llama.importance_matrix(ws, doc.quantizers)
    scored = tokens.shape[0] * (n_ctx - 1 - n_ctx // 2)
    with stages.stage("llama.cpp: quantize and measure", 2 + (len(PRESETS) if presets else 0)) as advance:
        fp_gap, _ = llama.perplexity(float_file, base, n_ctx)
        advance(1)
        gguf_file = work / "model.gguf"
        tensors = llama.quantize(float_file, gguf_file, types_file, ws, set(names.values()), matrix=matrix)
        for layer in layers_of(doc):
            wanted = ggml_type(layer.fmt, layer.in_features).value  # what the exported file asks for
            stored = tensors[names[layer.name]].tensor_type.name.lower()
            if stored != wanted.lower():
                raise BitallocError("--runtime", f"llama-quantize stored {layer.name} as {stored}, not {wanted}")
        stored_bytes = sum(int(tensors[names[n]].n_bytes) for n in doc.layers)
        matching = sum(llama.same_blocks(tensors[names[n]], ws.levels.read(n, f))
                       for n, f in doc.formats().items() if f.ggml)
        kl, ppl = llama.perplexity(gguf_file, base, n_ctx)
        vs_ours, _ = llama.perplexity(gguf_file, ours, n_ctx)
        advance(1)
        points = [RuntimePoint(
            runtime="llamacpp", label=picked.point.label, config=picked.point.config, bytes=other + stored_bytes,
            mib=round(mib(other + stored_bytes), 6), stored_layer_bytes=stored_bytes,
            counted_layer_bytes=doc.totals.bytes - other, file_bytes=gguf_file.stat().st_size,
            file_sha256=files_sha256([gguf_file]), loss=kl, quality=ppl, tokens=scored, bitalloc_loss=bitalloc_kl,
            details={"fp_gap_kl": fp_gap, "vs_bitalloc_kl": vs_ours, "layers_matching": float(matching)})]
        gguf_file.unlink()
        for preset in PRESETS if presets else ():
            path = work / f"{preset}.gguf"
            tensors = llama.quantize(float_file, path, types_file, ws, set(names.values()), preset=preset,
                                     matrix=matrix)  # the presets get the job's importance matrix too
            stored_bytes = sum(int(tensors[names[n]].n_bytes) for n in doc.layers)
            kl, ppl = llama.perplexity(path, base, n_ctx)
            points.append(RuntimePoint(
                runtime="llamacpp", kind="preset", label=f"llama.cpp {preset}", bytes=other + stored_bytes,
                mib=round(mib(other + stored_bytes), 6), stored_layer_bytes=stored_bytes,
                file_bytes=path.stat().st_size, file_sha256=files_sha256([path]), loss=kl, quality=ppl, tokens=scored,
                details={"fp_gap_kl": fp_gap}))
            path.unlink()
            advance(1)
    return points


RUNTIMES["llamacpp"] = verify_llamacpp

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_MODULES = {"hqq": "hqq", "llmcompressor": "llmcompressor", "gptqmodel": "gptqmodel"}


def runtimes_python(runtime_name: str) -> str:
    """The Python of the runtimes' environment (`BITALLOC_RUNTIMES_PYTHON`, else the checkout's `.venv-runtimes`),
    checked to import the runtime."""
    python = os.environ.get("BITALLOC_RUNTIMES_PYTHON") or str(ROOT / ".venv-runtimes" / "bin" / "python")
    module = RUNTIME_MODULES[runtime_name]
    if not Path(python).is_file():
        raise BitallocError("--runtime", f"{runtime_name} is not installed: no {python}; `./dev test` builds "
                                         f".venv-runtimes once, or set BITALLOC_RUNTIMES_PYTHON to a Python with "
                                         f"{module}")
    done = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
    if done.returncode:
        raise BitallocError("--runtime", f"{runtime_name} is not installed in {python} (import {module} fails)")
    return python


def exported(runtime_name: str, picked: Picked, nearest: bool) -> tuple[str, int]:
    """The runtime's file for the point, and how many layers it writes only as the nearest it can express; without
    `nearest` such a point is refused (the runtime would build another model than the one measured)."""
    layers = layers_of(picked.config)
    text, changed = export(runtime_name, layers, picked.config.model.type, nearest=True,
                           quantizers=picked.config.quantizers)
    if changed and not nearest:
        raise BitallocError("--runtime", f"{runtime_name} cannot build {len(changed)} of {len(layers)} layers of this "
                                         f"point as searched, e.g. {changed[0]}; verify a point of a job searched "
                                         f"with formats.target: {runtime_name}, or pass --nearest to measure what "
                                         f"the nearest export builds")
    if runtime_name in RUNTIME_MODULES:
        runtimes_python(runtime_name)
    return text, len(changed)


def as_folder(ws: Workspace, folder: Path) -> Path:
    """The loaded model as a transformers checkpoint folder (a GGUF source is loaded dequantized, and transformers
    will not save it as it is: its config without the GGUF quantization note, its weights as loaded)."""
    import copy

    from safetensors.torch import save_model

    folder.mkdir(parents=True)
    config = copy.deepcopy(ws.model.module.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    save_model(ws.model.module, str(folder / "model.safetensors"), metadata={"format": "pt"})
    ws.model.tokenizer.save_pretrained(folder)
    return folder


SAME_WEIGHT = 2**-10  # a difference below this share of the layer's largest weight is float16 rounding
MATCHING = 0.99  # a layer whose weights are this share the same is bitalloc's level: the rest round the other way
#                  on float differences (e.g. a Hessian summed in another order)


def _rel_diff(theirs: torch.Tensor, ours: torch.Tensor) -> float:
    """The largest difference over the largest weight of ours."""
    return float((theirs - ours).abs().max() / ours.abs().max().clamp(min=1e-30))


def _same_share(theirs: torch.Tensor, ours: torch.Tensor) -> float:
    """The share of weights equal to ours up to float16 rounding."""
    return float(((theirs - ours).abs() <= SAME_WEIGHT * ours.abs().max()).float().mean())


def verify_python(runtime_name: str):
    """A Python runtime driven as a subprocess in its own environment (`jobs/runtime_build.py`): the model handed to
    it as a transformers folder, the exported file applied by the runtime's own code, each quantized layer's weight
    as the runtime dequantizes it measured by bitalloc's evaluator on the job's held-out tokens, and compared with
    bitalloc's level (`weight_max_rel_diff`: the largest difference over the layer's largest weight;
    `layers_matching`: the layers whose weights are bitalloc's levels, at least 99 % of them up to float16 rounding)."""

    def build(ws: Workspace, picked: Picked, text: str, work: Path, presets: bool,
              stages: Stages) -> list[RuntimePoint]:
        from safetensors.torch import load_file, save_file

        doc = picked.config
        file = work / f"export-{runtime_name}.txt"
        file.write_text(text)
        with stages.stage(f"{runtime_name}: build the model"):
            model_dir = as_folder(ws, work / "model")
            calibration = work / "calibration.safetensors"
            save_file({"input_ids": ws.data.calibration.contiguous()}, str(calibration))
            out = work / "built"
            out.mkdir()
            done = subprocess.run([runtimes_python(runtime_name), str(ROOT / "jobs" / "runtime_build.py"), runtime_name,
                                   str(model_dir), str(file), str(out), str(calibration)],
                                  capture_output=True, text=True)
            said = (done.stdout.strip().splitlines() or ["no output"])[-1]
            if done.returncode:
                raise BitallocError("--runtime", f"{runtime_name} could not build the point: {said}")
        weights = load_file(str(out / "weights.safetensors"))
        stored = json.loads((out / "stored.json").read_text())
        missing = sorted(set(n for n, f in doc.formats().items() if f.quantized) - set(weights))
        if missing:
            raise BitallocError("--runtime", f"{runtime_name} left {len(missing)} layers of the config unquantized, "
                                             f"e.g. {missing[0]}")
        dtype = next(ws.model.module.parameters()).dtype
        pairs = [(weights[n], ws.levels.weight(n, f).float()) for n, f in doc.formats().items() if f.quantized]
        with stages.stage(f"{runtime_name}: measure"):
            measured = ws.local_runner().evaluator("evaluation").evaluate_tensors(
                {n: w.to(dtype) for n, w in weights.items() if n in doc.layers})
        other = picked.front.model.other_bytes
        stored_bytes = sum(stored[n] for n in weights if n in doc.layers)
        kept = sum(weight_bytes(*doc.shapes[n], f) for n, f in doc.formats().items() if n not in weights)
        files = sorted(p for p in (out / "checkpoint").rglob("*") if p.is_file()) if (out / "checkpoint").is_dir() \
            else [out / "weights.safetensors"]
        return [RuntimePoint(
            runtime=runtime_name, label=picked.point.label, config=picked.point.config,
            bytes=other + stored_bytes + kept, mib=round(mib(other + stored_bytes + kept), 6),
            stored_layer_bytes=stored_bytes + kept, counted_layer_bytes=doc.totals.bytes - other,
            file_bytes=sum(f.stat().st_size for f in files), file_sha256=files_sha256(files), loss=measured.loss,
            quality=measured.quality, tokens=measured.tokens, bitalloc_loss=picked.point.loss,
            details={"weight_max_rel_diff": max(_rel_diff(*p) for p in pairs),
                     "layers_matching": float(sum(_same_share(*p) >= MATCHING for p in pairs))})]

    return build


for _name in ("hqq", "llmcompressor", "gptqmodel"):
    RUNTIMES[_name] = verify_python(_name)


def record(picked: Picked, points: list[RuntimePoint], console: Console) -> None:
    """Into front.json (a point verified again replaces its earlier record), the front plot, and MLflow."""
    front = picked.front
    kept = [r for r in front.runtime_points if (r.runtime, r.label) not in {(p.runtime, p.label) for p in points}]
    front.runtime_points = kept + points
    configio.write(front.document(), picked.folder / "front.json")  # a run's results: fetched, then logged back
    plots = picked.folder / "plots"
    if plots.is_dir():
        from bitalloc.dashboards.plots import dashboard_html, front_png
        from bitalloc.sensitivity.cache import load

        front_png(front, plots / "front.png")
        table = load(picked.folder / "sensitivity.json")
        if table is not None:
            configs = {p.config: read_config(picked.folder / p.config) for p in front.points}
            (plots / "dashboard.html").write_text(dashboard_html(front, table, configs))
    if front.tracking is not None:
        from bitalloc.dashboards.tracking import log_runtime_points

        log_runtime_points(front, points, picked.folder, console)


def verify(target: str, avg_bits, budget, point, runtime_name: str, presets: bool, nearest: bool,
           tracking_uri: Optional[str], console: Console) -> tuple[Picked, list[RuntimePoint]]:
    if runtime_name not in RUNTIMES:
        raise BitallocError("--runtime", f"{runtime_name!r} is not a runtime bitalloc verifies; allowed: "
                                         f"{', '.join(RUNTIMES)}")
    if presets and runtime_name != "llamacpp":
        raise BitallocError("--presets", f"presets are llama.cpp's; {runtime_name} has none")
    check_avg_bits(avg_bits)
    from .runner import open_workspace
    from .spec import load_spec

    with job_folder(target, tracking_uri) as folder:
        picked = pick(folder, avg_bits, budget, point)
        text, rewritten = exported(runtime_name, picked, nearest)
        spec = load_spec(folder / "spec.yaml")
        with Stages(console) as stages, \
                tempfile.TemporaryDirectory(prefix=f"bitalloc-verify-{runtime_name}-") as work:
            ws = open_workspace(spec, stages)
            points = RUNTIMES[runtime_name](ws, picked, text, Path(work), presets, stages)
        for p in points:
            if p.kind == "point" and rewritten:
                p.details["nearest_layers"] = float(rewritten)
                p.label = f"{p.label} (nearest)"
        record(picked, points, console)
    return picked, points
