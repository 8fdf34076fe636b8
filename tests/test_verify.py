"""`bitalloc verify`: a point built by its runtime from the exported file and measured there agrees with what the front
measured and counted; what cannot be verified is a one-line error that leaves the job's results as they were.
(llama.cpp's tools are built on first use unless the cache has them: 3-5 minutes on 2 cores.)"""

from __future__ import annotations

import json

import pytest
import yaml

from bitalloc.cli import main
from bitalloc.results import read_config
from conftest import front_of, tiny_job
from helpers import one_line_error, python_runtime_job


def test_llamacpp_builds_what_the_front_measured(llamacpp_job, capsys):
    """The artifact holds bitalloc's levels byte for byte (the tied token embedding's too) and is what llama-quantize
    writes from the exported types and the job's importance matrix, in a file of the front's bytes; llama.cpp
    measures their KL close to the front's."""
    main(["verify", str(llamacpp_job), "--point", "1", "--runtime", "llamacpp"])
    said = capsys.readouterr().out
    front = front_of(llamacpp_job)
    (built,) = [r for r in front.runtime_points if r.runtime == "llamacpp"]
    assert built.label == front.mixed[0].label and built.config == front.mixed[0].config
    assert built.stored_layer_bytes == built.counted_layer_bytes  # llama.cpp stores exactly the bytes counted
    doc = read_config(llamacpp_job / built.config)
    quantized = [f for f in doc.formats().values() if f.quantized]
    assert quantized and built.details["layers_matching"] == len(quantized)
    assert doc.formats()["model.embed_tokens"].quantized
    # the artifact built from the levels is the file llama-quantize writes from the exported types, tensor for
    # tensor; the front's bytes are that file's, metadata and tokenizer included, to the byte (the model card apart)
    assert built.details["recipe_tensors_matching"] == built.details["tensors"]
    assert built.bytes == front.mixed[0].bytes and front.model.bytes_of == "llamacpp"
    assert built.file_bytes == built.bytes + built.details["card_bytes"] and 0 < built.details["card_bytes"] < 4096
    assert built.details["fp_gap_kl"] < 1e-3  # the float GGUF runs the same model as bitalloc's float32
    assert built.loss > 0 and abs(built.loss - built.bitalloc_loss) <= 0.25 * built.bitalloc_loss
    assert "recorded in" in said
    assert (llamacpp_job / "plots" / "front.png").is_file()


def test_an_export_of_imatrix_levels_brings_the_importance_matrix(llamacpp_job, tmp_path, capsys):
    """llama-quantize makes other levels without the job's importance matrix: export writes it beside the types
    file (the one verify hands llama-quantize to reproduce the levels byte for byte) and says how to pass it."""
    from bitalloc.jobs.runner import open_workspace
    from bitalloc.jobs.spec import load_spec
    from bitalloc.progress import Stages

    main(["export", str(llamacpp_job), "--point", "1", "--format", "llamacpp", "-o", str(tmp_path / "types.txt")])
    said = capsys.readouterr().out
    written = tmp_path / "types.imatrix.gguf"
    assert written.is_file() and "--imatrix" in said and str(written) in said
    store = open_workspace(load_spec(llamacpp_job / "spec.yaml"), Stages()).levels.stores["gguf"]
    assert written.read_bytes() == (store.folder / "imatrix.gguf").read_bytes()


def test_presets_are_measured_the_same_way_and_a_point_verified_again_is_replaced(llamacpp_job):
    main(["verify", str(llamacpp_job), "--point", "1", "--runtime", "llamacpp", "--presets"])
    front = front_of(llamacpp_job)
    points = [r for r in front.runtime_points if r.kind == "point"]
    presets = {r.label: r for r in front.runtime_points if r.kind == "preset"}
    assert len(points) == 1 and "llama.cpp Q8_0" in presets and "llama.cpp Q2_K" in presets
    assert presets["llama.cpp Q8_0"].loss < presets["llama.cpp Q2_K"].loss
    assert presets["llama.cpp Q8_0"].stored_layer_bytes > presets["llama.cpp Q2_K"].stored_layer_bytes


def test_what_cannot_be_verified_is_one_line_and_leaves_the_results(tiny_llama, text_dir, tmp_path, capsys,
                                                                    llamacpp_job):
    out = tmp_path / "rtn"
    spec = tiny_job(tiny_llama, text_dir, out)
    spec["tracking"] = {"enabled": False}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    main(["run", str(tmp_path / "job.yaml")])
    capsys.readouterr()
    before = (out / "front.json").read_text()
    err = one_line_error(capsys, ["verify", str(out), "--point", "1", "--runtime", "llamacpp"])
    assert "--runtime" in err and "cannot build" in err and "formats.target: llamacpp" in err
    err = one_line_error(capsys, ["verify", str(out), "--point", "1", "--runtime", "tensorrt"])
    assert "--runtime" in err and "llamacpp" in err
    err = one_line_error(capsys, ["verify", str(out), "--point", "99", "--runtime", "llamacpp"])
    assert "--point" in err
    err = one_line_error(capsys, ["verify", str(tmp_path), "--point", "1", "--runtime", "llamacpp"])
    assert "TARGET" in err
    assert (out / "front.json").read_text() == before
    assert json.loads(before).get("runtime_points", []) == []


def test_a_gguf_that_spells_a_held_out_token_otherwise_is_refused(tiny_smollm, tiny_llama, text_dir, tmp_path):
    """llama-perplexity reads token ids through the GGUF's vocabulary: where it spells a held-out token otherwise than
    the job's tokenizer, it would score other text, so verify stops before measuring."""
    from bitalloc.errors import BitallocError
    from bitalloc.formats import Format
    from bitalloc.quantizers.gguf.files import float_gguf
    from bitalloc.runtimes.llamacpp.measure import windows
    from bitalloc.model import load_model
    from bitalloc.pipeline import Workspace

    gguf_file = float_gguf(load_model(str(tiny_smollm)), tmp_path)
    opened = {m: Workspace.open(str(m), (Format(4, 32),), text=[str(text_dir / "*.txt")], seq_len=32, calibration=1,
                                evaluation=2) for m in (tiny_smollm, tiny_llama)}
    assert windows(opened[tiny_smollm], gguf_file).shape == opened[tiny_smollm].data.evaluation.shape
    with pytest.raises(BitallocError) as exc:
        windows(opened[tiny_llama], gguf_file)
    assert exc.value.field == "--runtime" and "tokenizer mismatch" in exc.value.message


def test_hqq_builds_the_point_with_the_bytes_counted(tiny_smollm, text_dir, tmp_path):
    """With --recipe, HQQ's own code applies the exported per-tag config to the model in float16: every layer's weights are
    bitalloc's levels (made by the same package, from the weights in HQQ's compute dtype, as its runtime config
    starts them) up to float16 arithmetic; its packed weights, scales and zeros are the bytes counted, and the model
    measures as the front's point did."""
    out = python_runtime_job(tiny_smollm, text_dir, tmp_path, "hqq")
    main(["verify", str(out), "--point", "1", "--runtime", "hqq", "--recipe"])
    (built,) = front_of(out).runtime_points
    quantized = [f for f in read_config(out / built.config).formats().values() if f.quantized]
    assert quantized and built.details["layers_matching"] == len(quantized)
    assert built.stored_layer_bytes == built.counted_layer_bytes
    assert built.loss > 0 and abs(built.loss - built.bitalloc_loss) <= 0.02 * built.bitalloc_loss


def test_llmcompressor_builds_the_point_with_its_gptq(tiny_smollm, text_dir, tmp_path):
    """With --recipe, llm-compressor's oneshot (its GPTQModifier, with the job's GPTQ parameters as the export writes
    them) saves a compressed-tensors checkpoint that transformers loads back: packed codes and float16 scales, the
    bytes counted for gptq-ct (the 16-byte shape per layer included). The first block's layers see the same (unquantized) inputs in both,
    so llm-compressor's GPTQ makes bitalloc's levels there; later layers get inputs through the already quantized
    ones in llm-compressor, so the KL is close to the front's, not equal."""
    gptq = {"damp": 0.05, "act_order": True, "block": 32}
    out = python_runtime_job(tiny_smollm, text_dir, tmp_path, "llmcompressor", params=gptq)
    main(["verify", str(out), "--point", "1", "--runtime", "llmcompressor", "--recipe"])
    (built,) = front_of(out).runtime_points
    doc = read_config(out / built.config)
    assert built.label.endswith("(recipe)") and "artifact" not in built.details
    assert {f.method for f in doc.formats().values()} == {"gptq-ct"} and doc.quantizers == {"gptq-ct": gptq}
    first_block = [n for n, f in doc.formats().items() if f.quantized and n.startswith("model.layers.0.")]
    assert first_block and built.details["layers_matching"] >= len(first_block)
    assert built.stored_layer_bytes == built.counted_layer_bytes
    assert built.loss > 0 and abs(built.loss - built.bitalloc_loss) <= 0.5 * built.bitalloc_loss


def test_an_llmcompressor_rtn_recipe_reproduces_bitalloc_levels(tiny_smollm, text_dir, tmp_path):
    """A point searched over llm-compressor's RTN (`rtn-int`: compressed-tensors' integer grid) is exported as a
    QuantizationModifier recipe and run through llm-compressor: the weights transformers loads back from the
    compressed-tensors checkpoint are bitalloc's levels up to float16 rounding, at the bytes counted (the 16-byte
    shape tensor compressed-tensors keeps per layer included), and measure the same KL."""
    out = python_runtime_job(tiny_smollm, text_dir, tmp_path, "llmcompressor", "rtn-int")
    main(["export", str(out), "--point", "1", "--format", "llmcompressor", "-o", str(tmp_path / "recipe.yaml")])
    assert "QuantizationModifier" in (tmp_path / "recipe.yaml").read_text()
    main(["verify", str(out), "--point", "1", "--runtime", "llmcompressor", "--recipe"])
    (built,) = front_of(out).runtime_points
    assert built.details["weight_max_rel_diff"] <= 2 ** -10
    assert built.stored_layer_bytes == built.counted_layer_bytes
    assert abs(built.loss - built.bitalloc_loss) <= 1e-3 * built.bitalloc_loss + 1e-9
