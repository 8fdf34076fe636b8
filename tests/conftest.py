"""Tiny random-init transformers models built in code, saved as local model directories, plus a text corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# CI runs the same examples every time; locally hypothesis keeps exploring new ones
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(autouse=True, scope="session")
def _table_cache(tmp_path_factory):
    """Sensitivity tables and levels go to a fresh cache per test session, never the user's; llama.cpp's tools
    (built binaries, keyed by version) are shared with the user's cache, so they are built once, not per session."""
    from bitalloc.quantizers.gguf import tools as llamacpp

    os.environ.setdefault("BITALLOC_LLAMA_CPP", str(llamacpp.build_dir()))
    os.environ["BITALLOC_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True, scope="session")
def _tracking_store(tmp_path_factory):
    """Jobs are tracked in a per-session MLflow sqlite store, never one in the working directory."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"


_VALIDATED: set[Path] = set()


@pytest.fixture(autouse=True)
def _fronts_match_the_shipped_schema(request, tmp_path_factory):
    """Every front.json a test job writes validates against the JSON Schema shipped in bitalloc/schemas/
    (except where a test damages results on purpose: `@pytest.mark.edits_results`)."""
    edited = request.getfixturevalue("tmp_path") if request.node.get_closest_marker("edits_results") else None
    yield
    if edited is not None:
        _VALIDATED.update(edited.rglob("front.json"))
    import json

    import jsonschema

    from bitalloc.results import SCHEMA_DIR

    schema = json.loads((SCHEMA_DIR / "front.schema.json").read_text())
    for path in tmp_path_factory.getbasetemp().rglob("front.json"):
        if path in _VALIDATED or ".partial" in str(path) or ".old" in str(path):
            continue
        _VALIDATED.add(path)
        doc = json.loads(path.read_text())
        if doc.get("schema") == "bitalloc.front/2":
            jsonschema.validate(doc, schema)


def front_of(out: Path):
    """The typed front of a job's output dir."""
    from bitalloc.results import read_front

    return read_front(Path(out) / "front.json")


WORDS = (
    "to be or not to be that is the question whether tis nobler in the mind to suffer the slings and arrows "
    "of outrageous fortune or to take arms against a sea of troubles and by opposing end them"
).split()


def _corpus(n_words: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(WORDS), (n_words,), generator=g)
    return " ".join(WORDS[i] for i in idx.tolist())


def _tokenizer(text: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=96, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("texts")
    for i in range(3):
        (d / f"part{i}.txt").write_text(_corpus(3000, i))
    return d


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, text_dir) -> Path:
    """Llama-style: 2 blocks, hidden 48 (group 32 leaves a 16-wide tail), tied lm_head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = _tokenizer((text_dir / "part0.txt").read_text())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return _save(LlamaForCausalLM(cfg), tok, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, text_dir) -> Path:
    """GPT-2-style: Conv1D layers stored [in, out], lm_head tied to wte."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tok = _tokenizer((text_dir / "part0.txt").read_text())
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128)
    return _save(GPT2LMHeadModel(cfg), tok, tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's tokenizer, read from the default model's GGUF without loading its weights."""
    from transformers import AutoTokenizer

    from bitalloc.model import DEFAULT_MODEL, source_files

    folder, gguf_file = source_files(DEFAULT_MODEL)
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file.name)


@pytest.fixture(scope="session")
def tiny_smollm(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A float32 Llama with rows llama.cpp's blocks take (64 and 256 wide) and SmolLM2's tokenizer, which llama.cpp's
    converter knows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256, tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("tiny-smollm")
    LlamaForCausalLM(config).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


def tiny_job(model_dir: Path, text_dir: Path, out: Path, **overrides) -> dict:
    """A job spec dict that runs in seconds on a tiny model."""
    spec = {
        "name": "tiny",
        "seed": 0,
        "model": {"source": str(model_dir)},
        "formats": {"bits": [2, 3, 4, 8], "group_size": 32},
        "data": {"source": [str(text_dir / "*.txt")], "seq_len": 32, "calibration": 2, "evaluation": 4,
                 "batch_size": 2},
        "search": {"budgets": [4.0, 5.0], "points": 3},
        "run": {"workers": 0},
        "output": str(out),
    }
    for key, value in overrides.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


@pytest.fixture(scope="session")
def llamacpp_job(tiny_smollm, text_dir, tmp_path_factory) -> Path:
    """A finished llamacpp-target job (importance-matrix levels) on the tiny SmolLM2: what verify and build read."""
    out = tmp_path_factory.mktemp("llamacpp-job") / "out"
    spec = tiny_job(tiny_smollm, text_dir, out, data={"seq_len": 64, "calibration": 2, "evaluation": 4},
                    search={"budgets": [5.0], "points": 2})
    spec.update(formats={"target": "llamacpp", "params": {"imatrix": True}}, tracking={"enabled": False})
    import yaml

    from bitalloc.cli import main

    (out.parent / "job.yaml").write_text(yaml.safe_dump(spec))
    main(["run", str(out.parent / "job.yaml")])
    return out
