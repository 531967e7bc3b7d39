#!/usr/bin/env python3
"""Independent numpy re-implementation of the fixture models, checked against the oracle logits.

This is a cross-check of the *fixtures themselves* (and of `to_gguf.py`), needing no torch:

* every HF fixture dir is loaded from its safetensors + config.json and run through a plain numpy
  forward (RMSNorm, rotate-half RoPE incl. llama3 scaling, GQA, causal/sliding-window attention,
  SwiGLU, the four MoE flavours); logits must match `logits.f32` and the greedy continuation
  must match `ref.json`;
* the GGUF files are run from their own tensors with llama.cpp's conventions (llama: interleaved
  RoPE on permuted q/k rows with `freq_i / rope_freqs[i]`; qwen3moe: NEOX RoPE), F32 files must
  match `logits.f32` tightly, Q8_0 files loosely (reported).

It documents in executable form exactly what the fixtures mean, for whoever writes the Rust side.

Usage: python3 tools/oracle/check_numpy.py [--fixtures tests/fixtures]
"""

import argparse
import json
import os
import sys

import numpy as np

from to_gguf import load_dir

try:
    import gguf
except ImportError:  # GGUF checks are skipped without the gguf package
    gguf = None


def rms(x, w, eps):
    x64 = x.astype(np.float64)
    return (x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps) * w).astype(np.float64)


def silu(x):
    return x / (1.0 + np.exp(-x))


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def inv_freqs(cfg, head_dim):
    rp = cfg["rope_parameters"]
    base = rp["rope_theta"]
    inv = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if rp.get("rope_type", "default") == "llama3":
        factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
        old = rp["original_max_position_embeddings"]
        wl = 2 * np.pi / inv
        out = np.where(wl > old / lo, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        mid = ~(wl < old / hi) & ~(wl > old / lo)
        out = np.where(mid, (1 - smooth) * out / factor + smooth * out, out)
        inv = out
    return inv


def rope(x, inv, style):
    """x: [T, H, D]. style 'neox' = rotate-half (HF), 'interleaved' = pairs (2i, 2i+1) (ggml normal)."""
    T, _, D = x.shape
    ang = np.arange(T)[:, None] * inv[None, :]  # [T, D/2]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if style == "neox":
        a, b = x[..., : D // 2], x[..., D // 2 :]
        return np.concatenate([a * c - b * s, a * s + b * c], -1)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * c - b * s
    out[..., 1::2] = a * s + b * c
    return out


def forward(m, ids):
    """m: canonical model dict (see from_hf / from_gguf)."""
    cfg = m["cfg"]
    nh, nkv, hd, eps = m["n_head"], m["n_kv"], m["head_dim"], cfg["rms_norm_eps"]
    x = m["embed"][ids].astype(np.float64)
    T = len(ids)
    mask = np.tril(np.ones((T, T), dtype=bool))
    if m.get("window"):
        idx = np.arange(T)
        mask &= idx[None, :] > idx[:, None] - m["window"]  # HF: kv > q - window
    for L in m["layers"]:
        h = rms(x, L["attn_norm"], eps)
        q = h @ L["wq"].T + L.get("bq", 0)
        k = h @ L["wk"].T + L.get("bk", 0)
        v = h @ L["wv"].T + L.get("bv", 0)
        if "q_norm_full" in L:  # olmoe: norm over the whole projection
            q, k = rms(q, L["q_norm_full"], eps), rms(k, L["k_norm_full"], eps)
        q, k, v = q.reshape(T, nh, hd), k.reshape(T, nkv, hd), v.reshape(T, nkv, hd)
        if "q_norm" in L:  # qwen3: per-head norm
            q, k = rms(q, L["q_norm"], eps), rms(k, L["k_norm"], eps)
        q, k = rope(q, m["inv"], m["rope_style"]), rope(k, m["inv"], m["rope_style"])
        rep = nh // nkv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        att = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
        att = np.where(mask[None], att, -np.inf)
        o = np.einsum("hqk,khd->qhd", softmax(att), v).reshape(T, nh * hd)
        x = x + o @ L["wo"].T
        h = rms(x, L["ffn_norm"], eps)
        if "router" in L:
            probs = softmax(h @ L["router"].T)  # [T, E]
            top = np.argsort(-probs, -1, kind="stable")[:, : m["top_k"]]
            y = np.zeros_like(h)
            for t in range(T):
                w = probs[t, top[t]]
                if m["norm_topk"]:
                    w = w / w.sum()
                for e, we in zip(top[t], w):
                    g, u, d = L["experts"][e]
                    y[t] += we * (d @ (silu(g @ h[t]) * (u @ h[t])))
            if "shared" in L:
                g, u, d = L["shared"]
                sh = (silu(h @ g.T) * (h @ u.T)) @ d.T
                gate = 1.0 / (1.0 + np.exp(-(h @ L["shared_gate"].T)))
                y = y + gate * sh
        else:
            y = (silu(h @ L["gate"].T) * (h @ L["up"].T)) @ L["down"].T
        x = x + y
    x = rms(x, m["out_norm"], eps)
    return x @ m["lm_head"].T


def from_hf(d):
    cfg, t = load_dir(d)
    mt = cfg["model_type"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
    n_exp = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    m = dict(cfg=cfg, n_head=nh, n_kv=nkv, head_dim=hd, inv=inv_freqs(cfg, hd), rope_style="neox")
    m["embed"] = t["model.embed_tokens.weight"]
    m["out_norm"] = t["model.norm.weight"]
    m["lm_head"] = t["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else t["lm_head.weight"]
    m["window"] = cfg.get("sliding_window") if mt == "mistral" else None
    m["top_k"] = cfg.get("num_experts_per_tok")
    m["norm_topk"] = cfg.get("norm_topk_prob", mt == "mixtral")  # mixtral always renormalises
    layers = []
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        L = dict(attn_norm=t[p + "input_layernorm.weight"], ffn_norm=t[p + "post_attention_layernorm.weight"])
        for n in "qkvo":
            L["w" + n] = t[f"{p}self_attn.{n}_proj.weight"]
        for n in "qkv":
            if f"{p}self_attn.{n}_proj.bias" in t:
                L["b" + n] = t[f"{p}self_attn.{n}_proj.bias"]
        if f"{p}self_attn.q_norm.weight" in t:
            key = "q_norm_full" if mt == "olmoe" else "q_norm"
            L[key] = t[p + "self_attn.q_norm.weight"]
            L[key.replace("q_", "k_")] = t[p + "self_attn.k_norm.weight"]
        if mt == "mixtral":
            b = p + "block_sparse_moe."
            L["router"] = t[b + "gate.weight"]
            L["experts"] = [
                tuple(t[f"{b}experts.{e}.{w}.weight"] for w in ("w1", "w3", "w2")) for e in range(n_exp)
            ]
        elif p + "mlp.gate.weight" in t:
            b = p + "mlp."
            L["router"] = t[b + "gate.weight"]
            L["experts"] = [
                tuple(t[f"{b}experts.{e}.{w}_proj.weight"] for w in ("gate", "up", "down")) for e in range(n_exp)
            ]
            if b + "shared_expert.gate_proj.weight" in t:
                L["shared"] = tuple(t[f"{b}shared_expert.{w}_proj.weight"] for w in ("gate", "up", "down"))
                L["shared_gate"] = t[b + "shared_expert_gate.weight"]
        else:
            for w in ("gate", "up", "down"):
                L[w] = t[f"{p}mlp.{w}_proj.weight"]
        layers.append(L)
    m["layers"] = layers
    return m


def from_gguf(path, cfg):
    r = gguf.GGUFReader(path)
    arch = r.fields["general.architecture"].contents()

    def kv(k):
        return r.fields[f"{arch}.{k}"].contents()

    T = {}
    for te in r.tensors:
        a = gguf.quants.dequantize(te.data, te.tensor_type).astype(np.float64)
        T[te.name] = a
    nh, nkv, hd = kv("attention.head_count"), kv("attention.head_count_kv"), kv("attention.key_length")
    base = kv("rope.freq_base")
    inv = 1.0 / base ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    if "rope_freqs.weight" in T:
        inv = inv / T["rope_freqs.weight"]
    m = dict(cfg=dict(rms_norm_eps=kv("attention.layer_norm_rms_epsilon")), n_head=nh, n_kv=nkv, head_dim=hd, inv=inv)
    m["rope_style"] = "interleaved" if arch == "llama" else "neox"
    m["embed"], m["out_norm"] = T["token_embd.weight"], T["output_norm.weight"]
    m["lm_head"] = T.get("output.weight", T["token_embd.weight"])
    if arch == "qwen3moe":
        m["top_k"], m["norm_topk"] = kv("expert_used_count"), bool(kv("expert_weights_norm"))
    layers = []
    for i in range(kv("block_count")):
        b = f"blk.{i}."
        L = dict(attn_norm=T[b + "attn_norm.weight"], ffn_norm=T[b + "ffn_norm.weight"])
        L.update(wq=T[b + "attn_q.weight"], wk=T[b + "attn_k.weight"], wv=T[b + "attn_v.weight"])
        L["wo"] = T[b + "attn_output.weight"]
        if b + "attn_q_norm.weight" in T:
            L["q_norm"], L["k_norm"] = T[b + "attn_q_norm.weight"], T[b + "attn_k_norm.weight"]
        if b + "ffn_gate_inp.weight" in T:
            L["router"] = T[b + "ffn_gate_inp.weight"]
            g, u, d = (T[f"{b}ffn_{w}_exps.weight"] for w in ("gate", "up", "down"))
            L["experts"] = [(g[e], u[e], d[e]) for e in range(g.shape[0])]
        else:
            L.update(gate=T[b + "ffn_gate.weight"], up=T[b + "ffn_up.weight"], down=T[b + "ffn_down.weight"])
        layers.append(L)
    m["layers"] = layers
    return m


def greedy(m, ids, n):
    seq = list(ids)
    for _ in range(n):
        seq.append(int(np.argmax(forward(m, seq)[-1])))
    return seq[len(ids) :]


def write_q8_ref(stem, m, ref, logits, cont):
    """Reference for a Q8_0 file: float64 forward of its exactly-dequantised weights (d * q)."""
    seq = list(ref["tokens"])
    gaps = []
    for tok in cont:
        last = forward(m, seq)[-1]
        s = np.sort(last)
        gaps.append(float((s[-1] - s[-2]) / np.abs(last).max()))
        seq.append(tok)
    logits.astype("<f4").tofile(stem + ".logits.f32")
    out = {
        "gguf": os.path.basename(stem) + ".gguf",
        "source_fixture": ref["arch"],
        "tokens": ref["tokens"],
        "greedy": cont,
        "vocab_size": ref["vocab_size"],
        "n_positions": ref["n_positions"],
        "logits_file": os.path.basename(stem) + ".logits.f32",
        "logits_layout": "little-endian float32, row-major [n_positions, vocab_size]",
        "made_by": "tools/oracle/check_numpy.py --write-q8-refs (float64 numpy forward, dequantised weights)",
        "min_rel_gap_greedy": min(gaps),
    }
    with open(stem + ".ref.json", "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"   wrote {stem}.ref.json (min rel gap {min(gaps):.2e})")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default=os.path.join(here, "..", "..", "tests", "fixtures"))
    ap.add_argument(
        "--write-q8-refs",
        action="store_true",
        help="write gguf/<arch>-q8_0.{logits.f32,ref.json}: the reference of the dequantised Q8_0 model",
    )
    a = ap.parse_args()
    ok = True
    for arch in sorted(os.listdir(a.fixtures)):
        d = os.path.join(a.fixtures, arch)
        if not os.path.isfile(os.path.join(d, "ref.json")):
            continue
        ref = json.load(open(os.path.join(d, "ref.json")))
        V = ref["vocab_size"]
        want = np.fromfile(os.path.join(d, "logits.f32"), dtype="<f4").reshape(ref["n_positions"], V)
        scale = np.abs(want).max()
        runs = [("hf", from_hf(d), 1e-4, True)]
        if gguf is not None:
            for q, tol in (("f32", 1e-4), ("q8_0", None)):
                p = os.path.join(a.fixtures, "gguf", f"{arch}-{q}.gguf")
                if os.path.exists(p):
                    runs.append((f"gguf-{q}", from_gguf(p, None), tol, tol is not None))
        for name, m, tol, must_greedy in runs:
            got = forward(m, ref["tokens"])
            qref = os.path.join(a.fixtures, "gguf", f"{arch}-q8_0.ref.json")
            if name == "gguf-q8_0" and os.path.exists(qref) and not a.write_q8_refs:
                # the Q8_0 file against its own (dequantised-weights) reference: tight
                qr = json.load(open(qref))
                qw = np.fromfile(qref.replace(".ref.json", ".logits.f32"), dtype="<f4").reshape(got.shape)
                qrel = float(np.abs(got - qw).max() / np.abs(qw).max())
                qsame = greedy(m, ref["tokens"], len(qr["greedy"])) == qr["greedy"]
                ok &= qrel <= 1e-5 and qsame
                print(f"{arch:10s} {'q8-own-ref':10s} max|diff|/max|logit| = {qrel:.2e}  greedy "
                      f"{'same' if qsame else 'DIFFERS'}  {'ok' if qrel <= 1e-5 and qsame else 'FAIL'}")
            rel = float(np.abs(got - want).max() / scale)
            g = greedy(m, ref["tokens"], len(ref["greedy"]))
            same = g == ref["greedy"]
            good = (tol is None or rel <= tol) and (same or not must_greedy)
            ok &= good
            if a.write_q8_refs and name == "gguf-q8_0":
                write_q8_ref(os.path.join(a.fixtures, "gguf", f"{arch}-q8_0"), m, ref, got, g)
            print(f"{arch:10s} {name:10s} max|diff|/max|logit| = {rel:.2e}  greedy {'same' if same else 'DIFFERS'}"
                  f"  {'ok' if good else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
