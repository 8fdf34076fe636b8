"""The llama.cpp evaluation backend: a llama.cpp-target job's candidates are measured by llama.cpp's own forward, on
the job's tokens, from a GGUF assembled out of the level store. (llama.cpp is built on first use unless cached.)"""

from __future__ import annotations

import json
import signal
import subprocess

import numpy as np
import pytest
import torch
import yaml
from gguf import GGMLQuantizationType

from bitalloc.evaluate import model_output
from bitalloc.jobs.runner import open_workspace
from bitalloc.jobs.spec import load_spec
from bitalloc.progress import Stages
from bitalloc.quantizers.gguf.files import tensor_names
from bitalloc.quantizers.gguf.ggml import GGML_TYPES
from bitalloc.quantizers.gguf.index import read_tensors
from bitalloc.results import read_config
from bitalloc.runtimes.llamacpp.evaluator import LlamaCppRunner
from bitalloc.runtimes.llamacpp.measure import same_blocks
from bitalloc.tasks import EvalTask
from conftest import front_of, tiny_job
from helpers import one_line_error


@pytest.fixture(scope="module")
def opened(llamacpp_job):
    """The llama.cpp job's workspace and a llama.cpp backend over its levels (two threads)."""
    ws = open_workspace(load_spec(llamacpp_job / "spec.yaml"), Stages())
    return ws, LlamaCppRunner(ws.model, ws.levels, ws.token_sets(), ws.batch_size, 2)


def _configs(ws) -> list[dict]:
    """Every layer at one type, for each type of the job that fits every layer's rows, and two mixes of the cheapest
    and the dearest of them, alternating."""
    fitting = sorted((f for f in ws.formats if all(f.fits(l.in_features) for l in ws.layers)), key=lambda f: f.bits)
    names = [f.name for f in fitting]
    layers = [l.name for l in ws.layers]
    mixes = [{n: names[(i + k) % 2 * -1] for i, n in enumerate(layers)} for k in range(2)]
    return [{n: fmt for n in layers} for fmt in names] + mixes


def test_the_job_is_measured_by_llama_cpp_and_verify_agrees(llamacpp_job):
    """The front of a llama.cpp-target job records llama.cpp's arithmetic, and `llama-perplexity --kl-divergence` on
    the point's file (the one llama-quantize writes for its types, tensor for tensor) measures the front's KL on the
    same tokens and positions, up to the 16-bit log-probabilities of its base file."""
    from bitalloc.cli import main

    main(["verify", str(llamacpp_job), "--point", "1", "--runtime", "llamacpp"])
    front = front_of(llamacpp_job)
    assert front.evaluations.evaluator == "llamacpp" and "llama.cpp" in front.evaluations.where
    (built,) = [r for r in front.runtime_points if r.label == front.mixed[0].label]
    assert built.details["recipe_tensors_matching"] == built.details["tensors"]
    assert built.bitalloc_loss == front.mixed[0].loss and "vs_bitalloc_kl" not in built.details
    assert built.tokens == front.reference.tokens
    assert abs(built.loss - front.mixed[0].loss) <= 5e-3 * front.mixed[0].loss + 1e-6


def test_a_candidate_file_holds_the_levels_byte_for_byte(opened):
    ws, runner = opened
    assignment = _configs(ws)[-1]
    path = runner.candidate_file(assignment)
    try:
        tensors = read_tensors(path)
        names = tensor_names(ws.model.model_type, list(assignment))
        for name, fmt in assignment.items():
            fmt = ws.levels.format_named(fmt)
            if not fmt.quantized:  # f16 of the float weight (rows in the file's order)
                t = tensors[names[name]]
                ours = ws.model.weight(ws.levels.layers[name]).half().flatten().sort().values
                assert t.tensor_type == GGMLQuantizationType.F16, name
                assert torch.from_numpy(np.array(t.data)).view(torch.float16).flatten().sort().values.equal(ours)
                continue
            assert tensors[names[name]].tensor_type == GGML_TYPES[fmt.ggml].qtype, name
            assert same_blocks(tensors[names[name]], ws.levels.read(name, fmt)), name
    finally:
        path.unlink()


def test_its_kl_does_not_depend_on_threads_and_the_fp_model_scores_zero(opened):
    ws, runner = opened
    task = EvalTask.config({n: ws.levels.format_named(f) for n, f in _configs(ws)[0].items()}, "evaluation")
    one = LlamaCppRunner(ws.model, ws.levels, ws.token_sets(), ws.batch_size, 1).run(task)
    two = runner.run(task)
    assert one == two and one.loss > 0
    fp = runner.run(EvalTask("evaluation"))
    assert fp.loss == 0 and fp.tokens == two.tokens == ws.data.evaluation.shape[0] * (
        ws.data.evaluation.shape[1] - 1 - ws.data.evaluation.shape[1] // 2)


def test_torch_and_llama_cpp_rank_configs_alike_beyond_the_arithmetic_term(opened):
    """The two backends differ by llama.cpp's arithmetic (8-bit activations in quantized dot products); wherever two
    configs' KLs differ by more than both their terms, both backends put them in the same order."""
    ws, runner = opened
    evaluator = ws.local_runner().evaluator("evaluation")
    ref = runner.reference("evaluation")
    torch_kl, llama_kl = [], []
    for config in _configs(ws):
        formats = {n: ws.levels.format_named(f) for n, f in config.items()}
        with evaluator.streamed(formats), torch.no_grad():
            lq = [lp[ref.first:-1] for batch in ref.windows.split(2) for lp in model_output(ws.model, batch)]
        torch_kl.append(ref.measure(lq).loss)
        llama_kl.append(runner.run(EvalTask.config(formats, "evaluation")).loss)
    term = [abs(a - b) for a, b in zip(torch_kl, llama_kl)]
    assert max(term) < 0.05 * max(torch_kl)  # the same models, up to arithmetic
    compared = 0
    for i in range(len(term)):
        for j in range(len(term)):
            if torch_kl[i] - torch_kl[j] > term[i] + term[j]:
                compared += 1
                assert llama_kl[i] > llama_kl[j], (i, j, torch_kl, llama_kl)
    assert compared >= 3


def test_a_resumed_job_gives_the_same_front(tiny_smollm, text_dir, tmp_path):
    """Stopped once its first llama.cpp measurements (the `measured` estimator's) are checkpointed, then resumed: the
    same points and KLs as the job run through again (which finds the resumed job's table in the cache)."""
    from test_hardening import CLI, _stopped_once_checkpointed, _write

    def spec(out):
        s = tiny_job(tiny_smollm, text_dir, out, data={"seq_len": 64, "calibration": 4, "evaluation": 8},
                     sensitivity={"estimator": "measured"},
                     search={"budgets": [5.0], "points": 8, "evaluator": "llamacpp"})
        s.update(formats={"method": "gguf", "types": ["q4_0", "q4_1", "q5_0", "q8_0"]}, tracking={"enabled": False})
        return s

    out = tmp_path / "out"
    proc, err, _ = _stopped_once_checkpointed(_write(tmp_path, spec(out)), tmp_path, signal.SIGINT)
    assert proc.returncode == 130, err
    done = subprocess.run(CLI + ["run", "--resume", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (tmp_path / "a").mkdir()
    whole = tmp_path / "a" / "out"
    done = subprocess.run(CLI + ["run", _write(tmp_path / "a", spec(whole))], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    resumed, through = (json.loads((o / "front.json").read_text()) for o in (out, whole))
    assert resumed["evaluations"]["from_checkpoint"] > 0 and resumed["evaluations"]["evaluator"] == "llamacpp"
    assert [(p["label"], p["bytes"], p["loss"]) for p in resumed["points"]] == \
        [(p["label"], p["bytes"], p["loss"]) for p in through["points"]]


def test_llama_cpp_measures_only_llama_cpp_types(tiny_smollm, text_dir, tmp_path, capsys):
    out = tmp_path / "out"
    spec = tiny_job(tiny_smollm, text_dir, out, search={"evaluator": "llamacpp"})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    err = one_line_error(capsys, ["run", str(tmp_path / "job.yaml")])
    assert "search.evaluator" in err and "llama.cpp types" in err and not out.exists()
    spec["search"]["evaluator"] = "onnx"
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    err = one_line_error(capsys, ["run", str(tmp_path / "job.yaml")])
    assert "search.evaluator" in err and "llamacpp" in err


def test_a_config_doc_of_the_job_is_measured_as_its_point(llamacpp_job, opened):
    """The backend measures a written config of the job (its point) to the KL the front holds for it."""
    ws, runner = opened
    front = front_of(llamacpp_job)
    doc = read_config(llamacpp_job / front.mixed[0].config)
    again = runner.run(EvalTask.config(doc.formats(), "evaluation"))
    assert again.loss == front.mixed[0].loss and again.quality == front.mixed[0].quality


def test_ray_workers_measure_with_llama_cpp_as_the_job_process_does(llamacpp_job, tmp_path):
    """The same job on two Ray workers (one thread each): llama.cpp's measurements, the same to the last bit."""
    from test_hardening import CLI

    out = tmp_path / "ray"
    done = subprocess.run(CLI + ["run", str(llamacpp_job.parent / "job.yaml"), "--workers", "2", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ray, local = json.loads((out / "front.json").read_text()), json.loads((llamacpp_job / "front.json").read_text())
    assert ray["evaluations"]["evaluator"] == "llamacpp" and "2 Ray workers" in ray["evaluations"]["where"]
    assert [(p["label"], p["loss"], p["quality"]) for p in ray["points"]] == \
        [(p["label"], p["loss"], p["quality"]) for p in local["points"]]


def test_a_table_measured_by_llama_cpp_is_never_served_to_a_torch_job(opened):
    """The `measured` estimator's table holds its backend's arithmetic: cached apart per evaluator; a gradient
    estimator's does not depend on it."""
    from bitalloc.sensitivity import get_estimator
    from bitalloc.sensitivity.cache import table_key

    ws, _ = opened
    args = (ws.model_hash, ws.formats, ws.layers, ws.data.data_hash, 0)
    measured, fisher = get_estimator("measured"), get_estimator("fisher")
    assert table_key(measured, *args, evaluator="llamacpp") != table_key(measured, *args)
    assert table_key(fisher, *args, evaluator="llamacpp") == table_key(fisher, *args)


def test_the_build_takes_the_avx512_this_cpu_has_and_is_cached_under_its_name(monkeypatch):
    """llama.cpp is built for AVX2, plus the AVX-512 extensions the CPU reports (never AMX), in a cache folder named
    by them: a folder built for one instruction set is never run on a CPU without it."""
    from bitalloc.quantizers.gguf import tools

    monkeypatch.delenv("BITALLOC_LLAMA_CPP", raising=False)
    base = {"avx2", "fma", "f16c", "amx_tile", "amx_int8"}
    monkeypatch.setattr(tools, "cpu_flags", lambda: base)
    assert tools.isa_options() == () and tools.build_dir().name == tools.LLAMA_CPP_PYTHON
    monkeypatch.setattr(tools, "cpu_flags", lambda: base | set(tools.AVX512["GGML_AVX512"]) | {"avx512_vnni"})
    assert tools.isa_options() == ("GGML_AVX512", "GGML_AVX512_VNNI")
    assert tools.build_dir().name == f"{tools.LLAMA_CPP_PYTHON}-avx512+vnni"
    monkeypatch.setattr(tools, "cpu_flags", lambda: base | {"avx512f", "avx512_vnni"})  # no BW/VL: AVX2 only
    assert tools.isa_options() == ()
