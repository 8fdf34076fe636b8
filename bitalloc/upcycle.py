"""Sparse upcycling: a dense Llama-family model turned into a Mixtral whose every expert is the dense MLP with its
intermediate channels permuted (a different tensor per expert, the same function) and whose top-k gates are
renormalised to sum to one — so the mixture computes the dense model's function exactly and its KL and perplexity
mean something, while its expert weights are what a real MoE's are to a quantizer: most of the model, in fused
3-D parameters. The router is seeded, so routing (and which expert's copy of a channel a token reads) varies.
"""

from __future__ import annotations

from pathlib import Path

import torch


def upcycle(dense, experts: int = 4, top_k: int = 2, seed: int = 0):
    """A MixtralForCausalLM computing `dense`'s function (a LlamaForCausalLM), in float32."""
    from transformers import MixtralConfig, MixtralForCausalLM

    c = dense.config
    if c.model_type != "llama":
        raise ValueError(f"upcycling reads a llama model, not {c.model_type!r}")
    config = MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None),
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=getattr(c, "rope_parameters", None), tie_word_embeddings=c.tie_word_embeddings,
        num_local_experts=experts, num_experts_per_tok=top_k, router_jitter_noise=0.0, sliding_window=None,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
    )
    moe = MixtralForCausalLM(config).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        source = {k: v.float() for k, v in dense.state_dict().items()}
        own = moe.state_dict()
        for key, value in source.items():
            if ".mlp." not in key and key in own:
                own[key].copy_(value)
        for i, layer in enumerate(moe.model.layers):
            prefix = f"model.layers.{i}.mlp."
            gate, up, down = (source[prefix + p + ".weight"] for p in ("gate_proj", "up_proj", "down_proj"))
            for e in range(experts):
                perm = torch.randperm(gate.shape[0], generator=g)
                layer.mlp.experts.gate_up_proj[e].copy_(torch.cat([gate[perm], up[perm]]))
                layer.mlp.experts.down_proj[e].copy_(down[:, perm])
            w = layer.mlp.gate.weight
            w.copy_(torch.randn(w.shape, generator=g) * w.shape[1] ** -0.5)
        if c.tie_word_embeddings:
            moe.tie_weights()
    return moe


def write_upcycled(dense_source: str, folder: Path, experts: int = 4, top_k: int = 2, seed: int = 0) -> Path:
    """The upcycled model of a model source (e.g. smollm2-135m) saved as a safetensors folder with its tokenizer."""
    from .model import load_model

    dense = load_model(dense_source)
    moe = upcycle(dense.module, experts, top_k, seed)
    folder.mkdir(parents=True, exist_ok=True)
    moe.save_pretrained(folder)
    dense.tokenizer.save_pretrained(folder)
    return folder
