"""`bitalloc build`: the artifact a runtime serves, written from the job's level store. llama.cpp's GGUF holds the
measured levels byte for byte — the very file llama-quantize writes from the exported types, plus the model card's
keys — at the front's bytes; a packed checkpoint loads with its card; what cannot be built is one line and leaves
nothing behind."""

from __future__ import annotations

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from bitalloc.cli import main
from bitalloc.errors import BitallocError
from bitalloc.quantizers.gguf.index import metadata, read_tensors
from conftest import front_of, tiny_job
from helpers import one_line_error


def _card(path) -> dict:
    import gguf

    fields = gguf.GGUFReader(path).fields
    return {k: fields[k].contents() for k in fields if k.startswith("bitalloc.")}


def test_the_gguf_is_llama_quantizes_file_of_the_levels_with_the_card(llamacpp_job, tmp_path, capsys):
    from bitalloc.jobs.runner import open_workspace
    from bitalloc.jobs.spec import load_spec
    from bitalloc.progress import Stages
    from bitalloc.quantizers.gguf.files import tensor_names
    from bitalloc.results import read_config
    from bitalloc.runtimes.llamacpp.measure import float_gguf, quantize

    out = tmp_path / "model.gguf"
    main(["build", str(llamacpp_job), "--point", "1", "--runtime", "llamacpp", "-o", str(out)])
    said = capsys.readouterr().out
    front = front_of(llamacpp_job)
    point = front.mixed[0]
    doc = read_config(llamacpp_job / point.config)
    assert "wrote" in said and str(out) in said
    # the recipe's file, made by llama-quantize from the exported types and the job's importance matrix
    types = tmp_path / "types.txt"
    main(["export", str(llamacpp_job), "--point", "1", "--format", "llamacpp", "-o", str(types)])
    ws = open_workspace(load_spec(llamacpp_job / "spec.yaml"), Stages())
    names = tensor_names(doc.model.type, list(doc.layers))
    recipe = tmp_path / "recipe.gguf"
    theirs = quantize(float_gguf(ws, tmp_path), recipe, types, ws, set(names.values()),
                      matrix=ws.levels.stores["gguf"].folder / "imatrix.gguf")
    ours = read_tensors(out)
    assert list(ours) == list(theirs)
    assert all(ours[n].tensor_type == theirs[n].tensor_type and bytes(ours[n].data) == bytes(theirs[n].data)
               for n in ours)
    # byte for byte that file's metadata too, then the card's keys; without the card, the front's bytes
    (ours_meta, _), (their_meta, _) = metadata(out), metadata(recipe)
    assert ours_meta[24:len(their_meta)] == their_meta[24:]
    card = _card(out)
    assert recipe.stat().st_size == point.bytes
    assert out.stat().st_size > point.bytes and out.stat().st_size - point.bytes < 4096
    assert card["bitalloc.point"] == point.label and card["bitalloc.bytes"] == point.bytes
    assert card["bitalloc.kl"] == pytest.approx(point.loss) and card["bitalloc.ppl"] == pytest.approx(point.quality)
    assert card["bitalloc.base_model.sha256"] == front.model.content_hash
    assert card["bitalloc.job_spec.sha256"] == doc.job_spec_hash


def test_an_existing_output_or_a_point_the_runtime_cannot_store_is_refused(llamacpp_job, tiny_smollm, text_dir,
                                                                          tmp_path, capsys):
    out = tmp_path / "model.gguf"
    out.write_text("mine")
    err = one_line_error(capsys, ["build", str(llamacpp_job), "--point", "1", "--runtime", "llamacpp", "-o",
                                   str(out)])
    assert "--output" in err and "--force" in err and out.read_text() == "mine"
    err = one_line_error(capsys, ["build", str(llamacpp_job), "--point", "1", "--runtime", "llamacpp", "-o",
                                   str(tmp_path / "model.bin")])
    assert "--output" in err and ".gguf" in err
    err = one_line_error(capsys, ["build", str(llamacpp_job), "--point", "1", "--runtime", "hqq", "-o",
                                   str(tmp_path / "hqq")])
    assert "--runtime" in err and "nearest" in err and "formats.target: hqq" in err
    assert not (tmp_path / "hqq").exists()
    err = one_line_error(capsys, ["build", str(llamacpp_job), "--point", "1", "--runtime", "gptqmodel", "-o",
                                   str(tmp_path / "gptq")])
    assert "--runtime" in err and "nearest" in err and "formats.target: gptqmodel" in err
    assert not (tmp_path / "gptq").exists()
    rtn = tmp_path / "rtn"
    spec = tiny_job(tiny_smollm, text_dir, rtn, search={"budgets": [4.0], "points": 1}, tracking={"enabled": False})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    main(["run", str(tmp_path / "job.yaml")])
    capsys.readouterr()
    err = one_line_error(capsys, ["build", str(rtn), "--point", "1", "--runtime", "llamacpp", "-o",
                                   str(tmp_path / "rtn.gguf")])
    assert "--runtime" in err and "nearest" in err and "formats.target: llamacpp" in err
    assert not (tmp_path / "rtn.gguf").exists() and not list(tmp_path.glob(".*partial*"))
    # --nearest: every layer at llama.cpp's nearest type, made by llama-quantize; the card names the layers changed
    from gguf import GGUFReader

    from bitalloc.results import read_config
    from bitalloc.runtimes import get_runtime, layers_of

    main(["build", str(rtn), "--point", "1", "--runtime", "llamacpp", "-o", str(tmp_path / "rtn.gguf"), "--nearest"])
    assert "nearest format (--nearest)" in capsys.readouterr().out
    doc = read_config(rtn / front_of(rtn).mixed[0].config)
    wanted = {l.name: p.value for l, p in zip(layers_of(doc), get_runtime("llamacpp").place(layers_of(doc),
                                                                                         doc.model.type).values())}
    reader = GGUFReader(tmp_path / "rtn.gguf")
    card = reader.fields["bitalloc.nearest"]
    assert bytes(card.parts[card.data[0]]).decode().count(" -> ") == len(wanted)
    types = {t.name: t.tensor_type.name.lower() for t in reader.tensors}
    from bitalloc.quantizers.gguf.files import tensor_names

    names = tensor_names(doc.model.type, list(wanted))
    assert len(set(wanted.values())) > 1 and all(types[names[n]] == v.lower() for n, v in wanted.items())
    # a Python runtime's nearest: HQQ's levels made by its own quantizer, written by its serializer
    from bitalloc.runtimes.python import ROOT

    if (ROOT / ".venv-runtimes" / "bin" / "python").exists():
        main(["build", str(rtn), "--point", "1", "--runtime", "hqq", "-o", str(tmp_path / "hqq"), "--nearest"])
        card = (tmp_path / "hqq" / "README.md").read_text()
        assert (tmp_path / "hqq" / "qmodel.pt").is_file() and "built with `--nearest`" in card and "-hqq" in card


def test_an_interrupted_build_leaves_nothing(llamacpp_job, tmp_path, monkeypatch, capsys):
    from bitalloc.quantizers.gguf import writer

    def interrupted(fh, meta, tensors, alignment):
        fh.write(meta)
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "write", interrupted)
    out = tmp_path / "model.gguf"
    with pytest.raises(SystemExit) as exit_:  # Ctrl-C midway through the file
        main(["build", str(llamacpp_job), "--point", "1", "--runtime", "llamacpp", "-o", str(out)])
    assert exit_.value.code == 130 and list(tmp_path.iterdir()) == []


def test_a_packed_build_loads_with_its_card(tiny_llama, text_dir, tmp_path, capsys):
    from bitalloc.results import read_config
    from bitalloc.runtimes.bitalloc.checkpoint import load_packed

    out = tmp_path / "job"
    spec = tiny_job(tiny_llama, text_dir, out, search={"budgets": [4.0], "points": 1}, tracking={"enabled": False})
    spec["formats"] = {"target": "bitalloc"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    main(["run", str(tmp_path / "job.yaml")])
    main(["build", str(out), "--point", "1", "--runtime", "bitalloc", "-o", str(tmp_path / "packed")])
    point = front_of(out).mixed[0]
    card = (tmp_path / "packed" / "README.md").read_text()
    assert point.label in card and f"{point.bytes:,}" in card and f"{point.loss:.6g}" in card
    model = load_packed(tmp_path / "packed")
    assert model.module is not None
    # the front's bytes are the packed folder's, model card aside, up to the widths of the measured figures and of
    # the header's shapes and offsets (a few bytes in this 40 kB folder)
    folder = sum(p.stat().st_size for p in (tmp_path / "packed").iterdir() if p.name != "README.md")
    assert front_of(out).model.bytes_of == "bitalloc" and abs(point.bytes - folder) <= 1e-3 * folder
    assert read_config(out / point.config).formats()["model.embed_tokens"].quantized  # the packed table counted
    with pytest.raises(BitallocError):
        from bitalloc.jobs.build import check_output
        from bitalloc.runtimes import get_runtime

        check_output(get_runtime("bitalloc"), tmp_path / "packed", force=False)


@pytest.mark.parametrize("runtime, budget, tensors", [
    ("llmcompressor", 5.0, lambda t, name: t[f"{name}.weight_packed"]),  # compressed-tensors packs rows as bitalloc
    ("gptqmodel", 3.0, lambda t, name: t[f"{name}.qweight"].T),  # GPTQ packs columns: the transpose
])
def test_a_checkpoint_runtime_loads_its_artifact_as_the_levels(runtime, budget, tensors, tiny_smollm, text_dir,
                                                               tmp_path, capsys):
    """The folder `build` writes holds the level store's codes and scales, and the runtime's own loader (transformers
    with compressed-tensors; GPTQModel's torch kernel) reads back every layer as bitalloc's level, at the bytes
    counted, measuring the front's KL; its card carries front.json's figures."""
    from safetensors.torch import load_file

    from bitalloc.jobs.runner import open_workspace
    from bitalloc.jobs.spec import load_spec
    from bitalloc.progress import Stages
    from bitalloc.results import read_config
    from bitalloc.runtimes import get_runtime
    from bitalloc.runtimes.folder import point_bytes
    from helpers import python_runtime_job

    out = python_runtime_job(tiny_smollm, text_dir, tmp_path, runtime, budget=budget)
    artifact = tmp_path / "artifact"
    main(["build", str(out), "--point", "1", "--runtime", runtime, "-o", str(artifact)])
    point = front_of(out).mixed[0]
    doc = read_config(out / point.config)
    card = (artifact / "README.md").read_text()
    assert point.label in card and f"{point.bytes:,}" in card and f"{point.loss:.6g}" in card
    written = load_file(str(artifact / "model.safetensors"))
    ws = open_workspace(load_spec(out / "spec.yaml"), Stages())
    quantized = {n: f for n, f in doc.formats().items() if f.quantized}
    assert len({f.bits for f in quantized.values()}) > 1  # a mixed point
    for name, fmt in quantized.items():
        assert f"{name}.weight" not in written and tensors(written, name).equal(ws.levels.read(name, fmt).qweight)
    main(["verify", str(out), "--point", "1", "--runtime", runtime])
    (built,) = front_of(out).runtime_points
    assert built.label == point.label and built.details["artifact"] == 1
    assert built.details["layers_matching"] == len(quantized) and built.details["weight_max_rel_diff"] <= 2 ** -10
    assert built.stored_layer_bytes == built.counted_layer_bytes
    assert abs(built.loss - built.bitalloc_loss) <= 1e-2 * built.bitalloc_loss + 1e-9
    # the front's bytes are the folder's, model card aside, up to the JSON that names the point's formats
    folder = sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file() and p.name != "README.md")
    assert front_of(out).model.bytes_of == runtime
    assert abs(point.bytes - folder) <= 1e-4 * folder and built.details["front_minus_folder_bytes"] == point.bytes - folder
    assert point_bytes(get_runtime(runtime), ws, doc.formats())[0] == folder  # computed exactly, nothing written


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.int8, torch.uint8]


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.text("abcdefgh._0123456789", min_size=1, max_size=12),
                       st.tuples(st.sampled_from(_DTYPES), st.lists(st.integers(0, 40), max_size=3)), max_size=8))
def test_the_counted_size_of_a_weights_file_is_the_written_one(tmp_path_factory, specs):
    """The folder runtimes' front bytes rest on this: a safetensors file's size computed from its tensors' names,
    dtypes and shapes is the size `save_file` writes, header and padding included."""
    from safetensors.torch import save_file

    from bitalloc.runtimes.folder import METADATA, safetensors_bytes

    tensors = {k: torch.zeros(shape, dtype=dtype) for k, (dtype, shape) in specs.items()}
    path = tmp_path_factory.mktemp("st") / "w.safetensors"
    save_file(tensors, str(path), metadata=METADATA)
    assert safetensors_bytes(tensors, METADATA) == path.stat().st_size


def test_hqqs_artifact_is_its_saved_model_of_the_levels(tiny_smollm, text_dir, tmp_path):
    """`build --runtime hqq` writes HQQ's saved model (its serializer's `qmodel.pt` and `config.json`, plus the
    tokenizer and card) whose packed codes are the level store's; HQQ's own loader reads every layer back as
    bitalloc's level, at the bytes counted, measuring the front's KL."""
    from hqq.core.quantize import Quantizer

    from bitalloc.jobs.runner import open_workspace
    from bitalloc.jobs.spec import load_spec
    from bitalloc.kernels.packed import unpack
    from bitalloc.progress import Stages
    from bitalloc.results import read_config
    from bitalloc.runtimes.hqq.saved import point_bytes
    from helpers import python_runtime_job

    out = python_runtime_job(tiny_smollm, text_dir, tmp_path, "hqq", budget=3.5)
    artifact = tmp_path / "artifact"
    main(["build", str(out), "--point", "1", "--runtime", "hqq", "-o", str(artifact)])
    assert {"qmodel.pt", "config.json", "README.md", "tokenizer.json"} <= {p.name for p in artifact.iterdir()}
    point = front_of(out).mixed[0]
    quantized = {n: f for n, f in read_config(out / point.config).formats().items() if f.quantized}
    assert len({f.bits for f in quantized.values()}) > 1  # a mixed point
    saved = torch.load(artifact / "qmodel.pt", weights_only=True)
    ws = open_workspace(load_spec(out / "spec.yaml"), Stages())
    for name, fmt in quantized.items():
        layer = saved[name]
        packing = layer["packing"]  # HQQ's serializer keeps its meta as plain values (no tensor encoding)
        codes = unpack(ws.levels.read(name, fmt)).codes
        groups = codes.numel() // fmt.group_size
        theirs = Quantizer.unpack[packing](layer["W_q"])[:groups].reshape(codes.shape)
        assert theirs.to(torch.uint8).equal(codes), name
    main(["verify", str(out), "--point", "1", "--runtime", "hqq"])
    (built,) = front_of(out).runtime_points
    assert built.details["artifact"] == 1 and built.details["layers_matching"] == len(quantized)
    assert built.stored_layer_bytes == built.counted_layer_bytes
    assert abs(built.loss - built.bitalloc_loss) <= 0.02 * built.bitalloc_loss
    # the front's bytes are the folder's (float16 beside the levels), model card aside, up to the zip's alignment
    folder = sum(p.stat().st_size for p in artifact.iterdir() if p.name != "README.md")
    assert front_of(out).model.bytes_of == "hqq"
    assert abs(point.bytes - folder) <= 1e-4 * folder and built.details["front_minus_folder_bytes"] == point.bytes - folder
    assert point_bytes(ws, read_config(out / point.config).formats())[0] == folder  # computed exactly, nothing written
