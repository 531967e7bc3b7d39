#!/usr/bin/env python3
"""Reference data for crates/flowgate-formats/tests/hf_config.rs, made by HF transformers.

Inputs: `<name>.v4.json`, config.json files in the transformers-4 key style (`rope_theta`,
`rope_scaling`, `num_experts`, `torch_dtype`), modelled on the real checkpoints' files
(Llama-3.2-1B, Mistral-7B-v0.1, Qwen2.5-0.5B, Qwen3-0.6B, Mixtral-8x7B-v0.1,
Qwen1.5-MoE-A2.7B, Qwen3-30B-A3B, OLMoE-1B-7B-0924).

For each, this script
  1. loads it with `AutoConfig.from_pretrained` (as transformers does for a checkpoint),
  2. writes `<name>.v5.json` with `save_pretrained`: the same model in the transformers-5 key
     style (`rope_parameters`, `dtype`, `num_local_experts`, `layer_types`, ...),
  3. records in `expected.json` what transformers resolved: sizes, head_dim, kv heads, rope,
     tied embeddings, eos/bos, and the per-layer structure its modeling code builds from the
     config (sliding window per layer, sparse layers, q/k/v bias, expert widths, top-k
     renormalisation).

It also records what transformers resolves for the oracle fixtures' configs
(`tests/fixtures/<arch>/config.json`, keys `fixture-<arch>`).

Needs only `transformers` (no torch): `pip install transformers`. Run from this directory:
    python3 make_expected.py
"""

import glob
import json
import os
import tempfile

import transformers
from transformers import AutoConfig


def sliding_per_layer(cfg):
    """The window each layer's attention uses, as the modeling code reads it."""
    w = getattr(cfg, "sliding_window", None)
    n = cfg.num_hidden_layers
    mt = cfg.model_type
    if mt in ("llama", "olmoe"):
        return [None] * n  # no sliding window in these attention classes
    lt = getattr(cfg, "layer_types", None)
    if lt is not None and mt in ("qwen2", "qwen3", "qwen2_moe"):
        # Qwen2/Qwen3/Qwen2Moe attention: window only on "sliding_attention" layers.
        return [w if t == "sliding_attention" and w else None for t in lt]
    # Mistral, Mixtral, Qwen3Moe attention: config.sliding_window on every layer.
    return [w if w else None for _ in range(n)]


def sparse_layers(cfg):
    mt = cfg.model_type
    n = cfg.num_hidden_layers
    if mt in ("qwen2_moe", "qwen3_moe"):
        # Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer.__init__
        e = cfg.num_experts
        return [
            (l not in cfg.mlp_only_layers) and e > 0 and (l + 1) % cfg.decoder_sparse_step == 0
            for l in range(n)
        ]
    if mt in ("mixtral", "olmoe"):
        return [True] * n
    return [False] * n


def expected(cfg):
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rp = dict(cfg.rope_parameters or {})
    eos = cfg.eos_token_id
    eos = [] if eos is None else (eos if isinstance(eos, list) else [eos])
    mt = cfg.model_type
    out = {
        "model_type": mt,
        "vocab_size": cfg.vocab_size,
        "hidden": cfg.hidden_size,
        "n_layers": cfg.num_hidden_layers,
        "n_heads": heads,
        "n_kv_heads": cfg.num_key_value_heads,
        "head_dim": head_dim,
        "intermediate_size": cfg.intermediate_size,
        "rms_eps": cfg.rms_norm_eps,
        "rope_theta": rp.get("rope_theta"),
        "rope_type": rp.get("rope_type", "default"),
        "rope_factor": rp.get("factor"),
        "rope_low_freq_factor": rp.get("low_freq_factor"),
        "rope_high_freq_factor": rp.get("high_freq_factor"),
        "rope_original_max_position": rp.get("original_max_position_embeddings"),
        "tied_embeddings": bool(cfg.tie_word_embeddings),
        "context_length": cfg.max_position_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_ids": eos,
        "sliding_window_per_layer": sliding_per_layer(cfg),
        "sparse_layers": sparse_layers(cfg),
        # Qwen2Attention: q/k/v bias=True; Qwen2MoeAttention: bias=config.qkv_bias;
        # Mistral/Mixtral: no bias; the others: bias=config.attention_bias.
        "qkv_bias": True
        if mt == "qwen2"
        else bool(getattr(cfg, "qkv_bias", True))
        if mt == "qwen2_moe"
        else False
        if mt in ("mistral", "mixtral")
        else bool(getattr(cfg, "attention_bias", False)),
    }
    if mt in ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe"):
        out["n_experts"] = cfg.num_experts if hasattr(cfg, "num_experts") else cfg.num_local_experts
        out["n_experts_used"] = cfg.num_experts_per_tok
        out["expert_ffn"] = (
            cfg.moe_intermediate_size if mt in ("qwen2_moe", "qwen3_moe") else cfg.intermediate_size
        )
        # MixtralSparseMoeBlock always renormalises; the others read norm_topk_prob.
        out["norm_topk_prob"] = True if mt == "mixtral" else bool(cfg.norm_topk_prob)
        out["shared_expert_ffn"] = (
            cfg.shared_expert_intermediate_size if mt == "qwen2_moe" else None
        )
    return out


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    result = {"transformers": transformers.__version__, "models": {}}
    for path in sorted(glob.glob(os.path.join(here, "*.v4.json"))):
        name = os.path.basename(path)[: -len(".v4.json")]
        with tempfile.TemporaryDirectory() as d:
            with open(path) as f, open(os.path.join(d, "config.json"), "w") as g:
                g.write(f.read())
            cfg = AutoConfig.from_pretrained(d)
        with tempfile.TemporaryDirectory() as d:
            cfg.save_pretrained(d)
            with open(os.path.join(d, "config.json")) as f:
                v5 = f.read()
        with open(os.path.join(here, f"{name}.v5.json"), "w") as f:
            f.write(v5)
        result["models"][name] = expected(cfg)
    # The oracle fixtures' configs (written by transformers 5 save_pretrained) as they are.
    fixtures = os.path.normpath(os.path.join(here, "../../../../../tests/fixtures"))
    for path in sorted(glob.glob(os.path.join(fixtures, "*", "config.json"))):
        arch = os.path.basename(os.path.dirname(path))
        cfg = AutoConfig.from_pretrained(os.path.dirname(path))
        result["models"][f"fixture-{arch}"] = expected(cfg)
    with open(os.path.join(here, "expected.json"), "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
