"""Every runtime is one package with every part a user reaches through it: a target (formats made by quantizers that
exist, each fitting the rows the runtime stores), an export (a recipe file, or bitalloc's packed checkpoint), a
verify, and the runtime's own code for its environment; the CLI names each of them."""

from __future__ import annotations

import inspect

import pytest
import yaml

from bitalloc import cli
from bitalloc.cli import main
from bitalloc.quantizers import QUANTIZERS
from bitalloc.runtimes import RUNTIMES, Runtime, get_runtime
from bitalloc.runtimes import venv as runtime_code
from conftest import front_of, tiny_job


def _overrides(cls, *names) -> bool:
    return any(getattr(cls, n) is not getattr(Runtime, n) for n in names)


@pytest.mark.parametrize("name", sorted(RUNTIMES))
def test_every_registered_runtime_has_every_part(name):
    runtime = get_runtime(name)
    cls = type(runtime)
    assert runtime.summary and runtime.methods and set(runtime.methods) <= set(QUANTIZERS)
    for method in runtime.methods:
        formats = runtime.formats(method, {})
        assert formats and {f.method for f in formats if f.quantized} == {method}  # 16 bits: no quantizer's
    if runtime.export_file:
        assert _overrides(cls, "render") and _overrides(cls, "place_one", "place")
    else:  # bitalloc's own: the packed checkpoint `bitalloc pack` writes
        assert name == "bitalloc"
    assert _overrides(cls, "verify")
    if runtime.library:
        module = runtime_code.load(name)
        assert module.LIBRARY == runtime.library
        assert callable(module.check) and inspect.signature(module.check).parameters.keys() == {"path", "config"}
        assert callable(getattr(module, "build", None)) == runtime.builds


def test_the_cli_names_every_runtime():
    """`verify --runtime` and `export --format` list what the registry holds (the CLI spells them out so that
    `--help` does not import torch)."""
    assert set(cli.RUNTIME_NAMES) == set(RUNTIMES)
    assert set(cli.RECIPES) == {n for n, cls in RUNTIMES.items() if cls.export_file}


def test_an_unknown_runtime_is_one_line_naming_every_runtime(capsys, tmp_path):
    (tmp_path / "front.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        main(["verify", str(tmp_path), "--point", "1", "--runtime", "vllm"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "--runtime" in err[0]
    assert all(name in err[0] for name in RUNTIMES)


def test_bitalloc_runtime_verifies_what_pack_writes(tiny_llama, text_dir, tmp_path, capsys):
    """bitalloc's own runtime: the point written as a packed checkpoint, loaded back by `load_packed`, holds the job's
    levels in every layer and measures the front's KL on the same tokens."""
    out = tmp_path / "out"
    spec = tiny_job(tiny_llama, text_dir, out, search={"budgets": [4.0], "points": 1})
    spec.update(formats={"target": "bitalloc", "method": "rtn"}, tracking={"enabled": False})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    main(["run", str(tmp_path / "job.yaml")])
    main(["verify", str(out), "--point", "1", "--runtime", "bitalloc"])
    capsys.readouterr()
    front = front_of(out)
    (built,) = front.runtime_points
    assert built.runtime == "bitalloc" and built.config == front.mixed[0].config
    assert built.stored_layer_bytes == built.counted_layer_bytes
    assert built.details["layers_matching"] == front.model.quantized_layers
    assert abs(built.loss - front.mixed[0].loss) <= 1e-6 * max(front.mixed[0].loss, 1e-6)
    assert front.model.bytes_of == "bitalloc"  # the packed folder's bytes, within its figures' widths
    assert abs(built.details["front_minus_folder_bytes"]) <= 1e-3 * built.file_bytes  # a few bytes of 40 kB
