"""One end-to-end run of the shipped example job on the real SmolLM2-135M, with little data."""

from pathlib import Path

from bitalloc.cli import main
from bitalloc.results import read_config
from conftest import front_of

EXAMPLE = Path(__file__).resolve().parents[1] / "jobs" / "examples" / "smollm2.yaml"


def test_default_job_on_the_real_model(tmp_path, capsys):
    out = tmp_path / "smollm2"
    main([
        "run", str(EXAMPLE), "--out", str(out),
        "--set", "data.seq_len=128", "--set", "data.calibration=1", "--set", "data.evaluation=2",
        "--set", "search.budgets=[3.5,4.5]", "--set", "search.points=2",
    ])
    front = front_of(out)
    # its Linear layers and the token embedding, which lm_head is tied to: one unit, packed row by row
    assert front.model.quantized_layers == 211
    per_block = 2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536  # q, o; k, v; gate, up, down
    assert front.model.quantized_params == 30 * per_block + 49152 * 576
    # the bytes are the packed folder's: the 61 norms stay float32, beside the file's header, the configs and the
    # 3.5 MB tokenizer
    floats = 4 * 61 * 576
    assert front.model.bytes_of == "bitalloc" and floats + 3_500_000 < front.model.other_bytes < floats + 4_000_000
    # the bitalloc target's formats, made by its best quantizer for them
    uniform = {u.format: u for u in front.uniform}
    assert sorted(uniform) == sorted(f"w{b}g{g}a-clip" for b in (2, 3, 4, 5, 6, 8) for g in (64, 128))
    assert uniform["w3g64a-clip"].avg_bits == 3.5 and uniform["w4g64a-clip"].avg_bits == 4.5
    # what the search is for: at the bytes of uniform 3- and 4-bit, the mixed config measures lower KL
    mixed = {p.label: p for p in front.mixed}
    for label, fmt in (("mixed @ 3.5 bits", "w3g64a-clip"), ("mixed @ 4.5 bits", "w4g64a-clip")):
        assert mixed[label].bytes <= uniform[fmt].bytes
        assert mixed[label].loss < 0.9 * uniform[fmt].loss, (label, mixed[label].loss, uniform[fmt].loss)
    # the measured front falls as bytes grow (within 5 % measurement noise on 256 held-out tokens)
    losses = [p.loss for p in front.mixed]
    assert all(b <= a * 1.05 for a, b in zip(losses, losses[1:])), losses
    assert 20 < front.reference.quality < 200
    said = capsys.readouterr()
    table = said.out
    assert "Pareto front" in table and "uniform w3g64a-clip" in table and "mixed @ 3.5 bits" in table
    # the embedding is searched, and the job says what the other bytes are
    assert "stays float32" not in said.err
    assert all("model.embed_tokens" in read_config(out / p.config).formats() for p in front.mixed)
    assert "MiB: bitalloc's checkpoint folder size (model card aside)" in " ".join(table.split())
