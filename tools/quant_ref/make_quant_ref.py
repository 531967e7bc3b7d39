#!/usr/bin/env python3
"""Reference vectors for flowgate's quant blocks, made with the python `gguf` package.

Writes to crates/flowgate-formats/tests/data/quant/ (or the directory given as argv[1]):

  deq_<TYPE>.bin  : raw blocks (random bytes; f16 scale fields replaced by random finite
                    f16 values with |v| in [1e-3, 1e-1] and a random sign)
  deq_<TYPE>.f32  : gguf.quants.dequantize(blocks) as little-endian f32
  q_<TYPE>.f32    : random f32 input rows (normal, varied scales; one all-zero block)
  q_<TYPE>.bin    : gguf.quants.quantize(input) bytes

Q8_K is not implemented by `gguf` (it is an activation-only format); its vectors come from
`q8k_dequantize` / `q8k_quantize` below, a direct numpy transcription of ggml's
`dequantize_row_q8_K` / `quantize_row_q8_K_ref` (iscale = -127/max, round half to even).

Deterministic: seeded numpy Generator. Run: python3 tools/quant_ref/make_quant_ref.py
"""
import os
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.path.dirname(__file__), "..", "..", "crates", "flowgate-formats", "tests", "data", "quant")

# Byte offsets of f16 scale fields inside one block.
F16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}
DEQ_TYPES = ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
Q_TYPES = ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
QK_K = 256


def rand_scales(rng, n):
    mag = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), n))
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    return (mag * sign).astype(np.float16)


def q8k_dequantize(blocks):
    d = blocks[:, 0:4].copy().view(np.float32)
    q = blocks[:, 4:260].copy().view(np.int8).astype(np.float32)
    return (d * q).astype(np.float32)


def q8k_quantize(x):
    out = np.zeros((x.shape[0], 292), dtype=np.uint8)
    for i, blk in enumerate(x):
        amax_i = int(np.argmax(np.abs(blk)))  # first of equal magnitudes, as ggml's strict '>'
        mx = blk[amax_i]
        if np.abs(mx) == 0:
            continue
        iscale = np.float32(-127.0) / mx
        q = np.minimum(np.rint(iscale * blk), 127).astype(np.int8)
        d = np.float32(1.0) / iscale
        bsums = q.astype(np.int16).reshape(16, 16).sum(axis=1).astype(np.int16)
        out[i, 0:4] = np.array([d], dtype=np.float32).view(np.uint8)
        out[i, 4:260] = q.view(np.uint8)
        out[i, 260:292] = bsums.view(np.uint8)
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(20261123)
    for name in DEQ_TYPES:
        qt = T[name]
        bs, ts = GGML_QUANT_SIZES[qt]
        n_elems = 512 if bs == 1 else (32 * bs if bs == 32 else 8 * bs)
        if name == "F16":
            raw = rng.normal(0, 2, n_elems).astype(np.float16).view(np.uint8)
        elif name == "BF16":
            f = (rng.normal(0, 2, n_elems) * np.exp(rng.uniform(-8, 8, n_elems))).astype(np.float32)
            raw = (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        else:
            nb = n_elems // bs
            raw = rng.integers(0, 256, (nb, ts), dtype=np.uint8)
            for off in F16_FIELDS[name]:
                raw[:, off:off + 2] = rand_scales(rng, nb).view(np.uint8).reshape(nb, 2)
            raw = raw.reshape(-1)
        y = quants.dequantize(raw.reshape(1, -1), qt).astype(np.float32).reshape(-1)
        assert y.size == n_elems and np.all(np.isfinite(y)), name
        raw.tofile(os.path.join(OUT, f"deq_{name}.bin"))
        y.astype("<f4").tofile(os.path.join(OUT, f"deq_{name}.f32"))

    # Q8_K dequantisation: random quants, random f32 scales.
    nb = 8
    raw = rng.integers(0, 256, (nb, 292), dtype=np.uint8)
    d = (rand_scales(rng, nb).astype(np.float32) * np.float32(1.2345)).astype(np.float32)
    raw[:, 0:4] = d.view(np.uint8).reshape(nb, 4)
    raw.reshape(-1).tofile(os.path.join(OUT, "deq_Q8_K.bin"))
    q8k_dequantize(raw).astype("<f4").reshape(-1).tofile(os.path.join(OUT, "deq_Q8_K.f32"))

    # Quantisation: random rows with per-block scales; block 1 is all zeros (d = 0 path).
    for name in Q_TYPES + ["Q8_K"]:
        bs = QK_K if name == "Q8_K" else 32
        nb = 8 if name == "Q8_K" else 32
        x = rng.normal(0, 1, (nb, bs)) * np.exp(rng.uniform(-6, 3, (nb, 1)))
        x[1, :] = 0.0
        x[2, 5] = -np.abs(x[2]).max() * 1.5  # a dominant negative value
        x = x.astype(np.float32)
        if name == "Q8_K":
            q = q8k_quantize(x)
        else:
            q = quants.quantize(x.reshape(1, -1), T[name])
        x.astype("<f4").reshape(-1).tofile(os.path.join(OUT, f"q_{name}.f32"))
        np.ascontiguousarray(q).view(np.uint8).reshape(-1).tofile(os.path.join(OUT, f"q_{name}.bin"))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
