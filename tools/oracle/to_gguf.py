#!/usr/bin/env python3
"""Convert oracle fixtures (HF safetensors) to GGUF, following llama.cpp's conventions.

Written from the facts of llama.cpp's `convert_hf_to_gguf.py` (key names, tensor names, the
q/k row permutation for llama, the llama3 `rope_freqs` factors, merged expert tensors) but with
no torch: tensors are read with `safetensors` into numpy and written with the `gguf` package.

Converted (each as F32 and Q8_0):
  llama     -> tests/fixtures/gguf/llama-{f32,q8_0}.gguf      (arch "llama")
  qwen3_moe -> tests/fixtures/gguf/qwen3_moe-{f32,q8_0}.gguf  (arch "qwen3moe")

Q8_0 files quantise every 2-D/3-D matrix (token_embd, output, attention, dense ffn, experts) with
`gguf.quants.quantize`; norms, the router (`ffn_gate_inp`) and `rope_freqs` stay F32, as in
llama.cpp.  No tokenizer is stored (`tokenizer.ggml.model` = "none").

Note: the qwen3_moe fixture has `mlp_only_layers=[1]`; that layer is written as dense
`blk.1.ffn_{gate,up,down}.weight`.  llama.cpp itself cannot run such a file, flowgate reads it.

Usage: python3 tools/oracle/to_gguf.py [--fixtures tests/fixtures]
"""

import argparse
import json
import math
import os

import gguf
import numpy as np
from safetensors.numpy import load_file

Q8 = gguf.GGMLQuantizationType.Q8_0
F32 = gguf.GGMLQuantizationType.F32


def load_dir(d):
    tensors = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(d, f)))
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    return cfg, {k: v.astype(np.float32) for k, v in tensors.items()}


def permute(w, n_head, n_head_kv=None):
    """llama.cpp's q/k row permutation: HF's rotate-half layout -> interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg):
    rp = cfg["rope_parameters"]
    base = rp["rope_theta"]
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rp.get("factor", 8.0)
    low = rp.get("low_freq_factor", 1.0)
    high = rp.get("high_freq_factor", 4.0)
    old_ctx = rp.get("original_max_position_embeddings", 8192)
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    out = []
    for fr in freqs:
        wavelen = 2 * math.pi / float(fr)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


class Out:
    def __init__(self, path, arch, cfg, q8):
        self.w = gguf.GGUFWriter(path, arch)
        self.q8 = q8
        self.arch = arch
        w = self.w
        w.add_custom_alignment(32)
        w.add_name(f"flowgate-oracle-{arch}")
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8 else gguf.LlamaFileType.ALL_F32)
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        w.add_context_length(cfg["max_position_embeddings"])
        w.add_embedding_length(cfg["hidden_size"])
        w.add_block_count(cfg["num_hidden_layers"])
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_head_count(cfg["num_attention_heads"])
        w.add_head_count_kv(cfg["num_key_value_heads"])
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        w.add_vocab_size(cfg["vocab_size"])
        w.add_tokenizer_model("none")

    def mat(self, name, arr):
        """A weight matrix (2-D or 3-D): Q8_0 in q8 files, else F32."""
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if self.q8:
            assert arr.shape[-1] % 32 == 0, (name, arr.shape)
            self.w.add_tensor(name, gguf.quants.quantize(arr, Q8), raw_dtype=Q8)
        else:
            self.w.add_tensor(name, arr)

    def f32(self, name, arr):
        self.w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))

    def close(self):
        self.w.write_header_to_file()
        self.w.write_kv_data_to_file()
        self.w.write_tensors_to_file()
        self.w.close()


def attn_common(o, t, i, cfg, llama_permute):
    p = f"model.layers.{i}."
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    q = t[p + "self_attn.q_proj.weight"]
    k = t[p + "self_attn.k_proj.weight"]
    if llama_permute:
        q = permute(q, nh, nh)
        k = permute(k, nh, nkv)
    o.f32(f"blk.{i}.attn_norm.weight", t[p + "input_layernorm.weight"])
    o.mat(f"blk.{i}.attn_q.weight", q)
    o.mat(f"blk.{i}.attn_k.weight", k)
    o.mat(f"blk.{i}.attn_v.weight", t[p + "self_attn.v_proj.weight"])
    o.mat(f"blk.{i}.attn_output.weight", t[p + "self_attn.o_proj.weight"])
    o.f32(f"blk.{i}.ffn_norm.weight", t[p + "post_attention_layernorm.weight"])


def head_tail(o, t, cfg):
    o.mat("token_embd.weight", t["model.embed_tokens.weight"])
    o.f32("output_norm.weight", t["model.norm.weight"])
    lm = t.get("lm_head.weight")
    if lm is not None and not cfg.get("tie_word_embeddings", False):
        o.mat("output.weight", lm)


def dense_ffn(o, t, i):
    p = f"model.layers.{i}.mlp."
    o.mat(f"blk.{i}.ffn_gate.weight", t[p + "gate_proj.weight"])
    o.mat(f"blk.{i}.ffn_up.weight", t[p + "up_proj.weight"])
    o.mat(f"blk.{i}.ffn_down.weight", t[p + "down_proj.weight"])


def convert_llama(cfg, t, path, q8):
    o = Out(path, "llama", cfg, q8)
    if cfg["rope_parameters"].get("rope_type") == "llama3":
        o.f32("rope_freqs.weight", llama3_rope_factors(cfg))
    head_tail(o, t, cfg)
    for i in range(cfg["num_hidden_layers"]):
        attn_common(o, t, i, cfg, llama_permute=True)
        dense_ffn(o, t, i)
    o.close()


def convert_qwen3moe(cfg, t, path, q8):
    o = Out(path, "qwen3moe", cfg, q8)
    n_exp = cfg.get("num_experts", cfg.get("num_local_experts"))
    o.w.add_expert_count(n_exp)
    o.w.add_expert_used_count(cfg["num_experts_per_tok"])
    o.w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    o.w.add_expert_weights_norm(bool(cfg.get("norm_topk_prob", False)))
    head_tail(o, t, cfg)
    mlp_only = set(cfg.get("mlp_only_layers", []))
    step = cfg.get("decoder_sparse_step", 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        attn_common(o, t, i, cfg, llama_permute=False)
        o.f32(f"blk.{i}.attn_q_norm.weight", t[p + "self_attn.q_norm.weight"])
        o.f32(f"blk.{i}.attn_k_norm.weight", t[p + "self_attn.k_norm.weight"])
        sparse = i not in mlp_only and n_exp > 0 and (i + 1) % step == 0
        if not sparse:
            dense_ffn(o, t, i)
            continue
        o.f32(f"blk.{i}.ffn_gate_inp.weight", t[p + "mlp.gate.weight"])
        for hf, gg in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            stacked = np.stack([t[f"{p}mlp.experts.{e}.{hf}.weight"] for e in range(n_exp)])
            o.mat(f"blk.{i}.ffn_{gg}_exps.weight", stacked)  # numpy [E, out, in] -> GGUF dims [in, out, E]
    o.close()


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default=os.path.join(here, "..", "..", "tests", "fixtures"))
    a = ap.parse_args()
    out_dir = os.path.join(a.fixtures, "gguf")
    os.makedirs(out_dir, exist_ok=True)
    for arch, fn in (("llama", convert_llama), ("qwen3_moe", convert_qwen3moe)):
        cfg, t = load_dir(os.path.join(a.fixtures, arch))
        for q8, suffix in ((False, "f32"), (True, "q8_0")):
            path = os.path.join(out_dir, f"{arch}-{suffix}.gguf")
            fn(cfg, t, path, q8)
            print(f"{path}: {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
