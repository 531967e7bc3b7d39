#!/usr/bin/env python3
"""Build tiny random-weight HF models and their reference outputs (the correctness oracle).

For every architecture flowgate supports this script builds a small config with
`transformers`, randomises *all* parameters (so that no weight is trivially zero or one), saves
the model with `save_pretrained` (safetensors + config.json, in the checkpoint layout real HF
repositories use) and writes:

* `ref.json`   - arch, the 40 prompt tokens, a 16-token greedy continuation, vocab size,
                 versions, the min top1-top2 logit gap, and the tensor names/shapes written;
* `logits.f32` - raw little-endian float32 logits of one full forward, shape [40, vocab].

The greedy continuation is a manual loop: at each step a full forward over the whole sequence,
argmax of the last row, no EOS stopping.  Everything runs on the CPU in float32 with eager
attention (no TF32, no fused kernels) so the numbers are as exact as torch gets.

Needs torch + transformers (5.x); run it where those are installed (see README.md).
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

N_POS = 40
N_GREEDY = 16
MAX_POS = 128


def base(vocab, **kw):
    d = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=MAX_POS,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    d.update(kw)
    return d


def configs():
    C = transformers
    out = {}
    # llama: llama3 rope scaling.  head_dim 16, theta 5e5 -> wavelengths 6.3, 32.6, 168, ...;
    # original_max 64 gives high_freq_wavelen 16 and low_freq_wavelen 64 so the three regimes
    # (kept, smoothed, divided by factor) all occur.
    out["llama"] = C.LlamaConfig(
        **base(
            320,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        )
    )
    out["mistral"] = C.MistralConfig(
        **base(288, sliding_window=8, rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    )
    out["qwen2"] = C.Qwen2Config(
        **base(
            304,
            tie_word_embeddings=True,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        )
    )
    out["qwen3"] = C.Qwen3Config(
        **base(
            272,
            head_dim=32,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        )
    )
    out["mixtral"] = C.MixtralConfig(
        **base(
            256,
            intermediate_size=64,
            num_local_experts=4,
            num_experts_per_tok=2,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        )
    )
    out["qwen2_moe"] = C.Qwen2MoeConfig(
        **base(
            336,
            intermediate_size=128,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=96,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        )
    )
    out["qwen3_moe"] = C.Qwen3MoeConfig(
        **base(
            352,
            head_dim=32,
            num_hidden_layers=3,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        )
    )
    out["olmoe"] = C.OlmoeConfig(
        **base(
            368,
            intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            rms_norm_eps=1e-5,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        )
    )
    return out


# What each fixture is meant to exercise (copied into ref.json as "exercises").
NOTES = {
    "llama": "llama3 rope scaling (factor 8, low 1, high 4, original_max 64, theta 5e5): the 8 rotary "
    "frequencies fall in all three regimes (kept / smoothed / divided by factor); GQA 4:2; "
    "sharded safetensors with model.safetensors.index.json",
    "mistral": "sliding_window 8 < 40 positions; HF mask keeps key j for query i iff i-8 < j <= i "
    "(the current token plus 7 previous)",
    "qwen2": "q/k/v biases; tie_word_embeddings (no lm_head.weight in the file)",
    "qwen3": "per-head q_norm/k_norm (RMSNorm over head_dim, before rope); head_dim 32 != hidden/heads 16",
    "mixtral": "4 experts top-2, softmax over all experts then top-2 renormalised to sum 1",
    "qwen2_moe": "4 experts top-2, norm_topk_prob false (softmax weights used as-is); shared expert "
    "(width 96) scaled by sigmoid(shared_expert_gate . x); q/k/v biases",
    "qwen3_moe": "8 experts top-2, norm_topk_prob true; mlp_only_layers [1]: layer 1 is a dense "
    "SwiGLU of intermediate_size 128, layers 0 and 2 are MoE; per-head q/k norm; head_dim 32",
    "olmoe": "8 experts top-2, norm_topk_prob false; q_norm/k_norm over the full projection width "
    "(q: heads*head_dim = 64, k: kv_heads*head_dim = 32), before the reshape into heads",
}


def randomise(model, gen, scale):
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(scale * noise)


@torch.no_grad()
def forward_logits(model, ids):
    out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0].to(torch.float32)


@torch.no_grad()
def greedy(model, ids, n):
    seq = list(ids)
    gaps = []
    for _ in range(n):
        last = forward_logits(model, seq)[-1]
        top2 = torch.topk(last, 2)
        gap = float(top2.values[0] - top2.values[1])
        gaps.append(gap / max(float(last.abs().max()), 1e-30))
        seq.append(int(top2.indices[0]))
    return seq[len(ids) :], gaps


def tensor_listing(d):
    from safetensors import safe_open

    names = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(d, f), framework="np") as sf:
                for k in sf.keys():
                    names[k] = {"shape": list(sf.get_slice(k).get_shape()), "file": f}
    return dict(sorted(names.items()))


def build(arch, cfg, out_dir, seed0):
    # Try a few seeds until every greedy step has a comfortable top1-top2 margin.
    for attempt in range(6):
        seed = seed0 + 1000 * attempt
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, **impl_kwargs(cfg))
        model = model.to(torch.float32).eval()
        gen = torch.Generator().manual_seed(seed)
        randomise(model, gen, scale=0.15)
        ids = torch.randint(0, cfg.vocab_size, (N_POS,), generator=gen).tolist()
        logits = forward_logits(model, ids)
        cont, gaps = greedy(model, ids, N_GREEDY)
        # also guard the prompt positions' argmax (Rust tests may compare them too)
        t2 = torch.topk(logits, 2, dim=-1).values
        pgap = float(((t2[:, 0] - t2[:, 1]) / logits.abs().max(dim=-1).values).min())
        if min(gaps) > 1e-3 and pgap > 1e-4:
            break
        print(f"  {arch}: seed {seed} min gap {min(gaps):.2e} / prompt {pgap:.2e}, retrying", flush=True)
    d = os.path.join(out_dir, arch)
    os.makedirs(d, exist_ok=True)
    kw = {}
    if arch == "llama":
        kw["max_shard_size"] = "256KB"  # exercise model.safetensors.index.json
    model.save_pretrained(d, safe_serialization=True, **kw)
    logits.numpy().astype("<f4").tofile(os.path.join(d, "logits.f32"))
    # sanity: a fresh load of what we wrote reproduces the logits bit-for-bit-ish
    re = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, **impl_kwargs(cfg)).eval()
    rl = forward_logits(re, ids)
    reload_diff = float((rl - logits).abs().max())
    ref = {
        "arch": arch,
        "model_type": cfg.model_type,
        "seed": seed,
        "exercises": NOTES[arch],
        "tokens": ids,
        "greedy": cont,
        "vocab_size": cfg.vocab_size,
        "n_positions": N_POS,
        "logits_file": "logits.f32",
        "logits_layout": "little-endian float32, row-major [n_positions, vocab_size]",
        "max_abs_logit": float(logits.abs().max()),
        "min_rel_gap_greedy": min(gaps),
        "min_rel_gap_prompt": pgap,
        "reload_max_abs_diff": reload_diff,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "weights_saved_with": "save_pretrained(safe_serialization=True, save_original_format=True default)",
        "tensors": tensor_listing(d),
    }
    with open(os.path.join(d, "ref.json"), "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")
    print(
        f"{arch:10s} seed {seed} max|logit| {ref['max_abs_logit']:.3f} "
        f"min rel gap greedy {min(gaps):.3e} prompt {pgap:.3e} reload diff {reload_diff:.2e} "
        f"greedy {cont}",
        flush=True,
    )
    return ref


def impl_kwargs(cfg):
    kw = {"attn_implementation": "eager"}
    if cfg.model_type in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        kw["experts_implementation"] = "eager"
    return kw


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*")
    a = ap.parse_args()
    torch.set_num_threads(min(16, os.cpu_count() or 1))
    torch.backends.cuda.matmul.allow_tf32 = False
    print("transformers", transformers.__version__, "torch", torch.__version__, flush=True)
    os.makedirs(a.out, exist_ok=True)
    failed = []
    for i, (arch, cfg) in enumerate(configs().items()):
        if a.only and arch not in a.only:
            continue
        try:
            ref = build(arch, cfg, a.out, seed0=1234 + i)
            if arch in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
                for k, v in ref["tensors"].items():
                    if ".layers.0." in k or ".layers.1." in k:
                        print(f"   {k} {v['shape']}")
            with open(os.path.join(a.out, arch, "config.json")) as f:
                c = json.load(f)
            keys = {k: c[k] for k in c if "rope" in k or "expert" in k or "window" in k or "norm" in k or "tie" in k or "mlp_only" in k or "sparse" in k or "head_dim" in k}
            print("   config keys:", json.dumps(keys), flush=True)
        except Exception as e:  # keep going so one bad arch doesn't cost the whole device call
            import traceback

            traceback.print_exc()
            failed.append(arch)
    if failed:
        print("FAILED:", failed, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
