#!/usr/bin/env python3
"""Writes a small GGUF file with the python `gguf` package's GGUFWriter, and the JSON that
describes what was put in it (from the writer's inputs, not by reading the file back).

Outputs crates/flowgate-formats/tests/data/gguf/python_written.{gguf,json} (JSON format as in
gguf_dump.py). All 13 metadata value types, nested arrays, a non-default alignment, and
tensors of several dtypes (F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K) with random data.
Deterministic (seeded). Run: python3 tools/quant_ref/make_gguf_ref.py
"""
import json
import os

import numpy as np
from gguf import GGUFWriter, GGUFValueType as VT, GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "crates", "flowgate-formats",
                   "tests", "data", "gguf")
ALIGN = 64


def f32bits(x):
    return int(np.array([x], dtype=np.float32).view(np.uint32)[0])


def f64bits(x):
    return int(np.array([x], dtype=np.float64).view(np.uint64)[0])


def V(t, v):
    return {"type": int(t), "value": v}


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(7)
    path = os.path.join(OUT, "python_written.gguf")
    w = GGUFWriter(path, "llama")
    meta = [{"key": "general.architecture", "value": V(VT.STRING, "llama")}]

    def add(key, val, vt, expected, sub=None):
        w.add_key_value(key, val, vt, sub_type=sub)
        meta.append({"key": key, "value": expected})

    add("t.u8", 200, VT.UINT8, V(VT.UINT8, 200))
    add("t.i8", -100, VT.INT8, V(VT.INT8, -100))
    add("t.u16", 60000, VT.UINT16, V(VT.UINT16, 60000))
    add("t.i16", -30000, VT.INT16, V(VT.INT16, -30000))
    add("t.u32", 4000000000, VT.UINT32, V(VT.UINT32, 4000000000))
    add("t.i32", -2000000000, VT.INT32, V(VT.INT32, -2000000000))
    f = float(np.float32(rng.normal()))
    add("t.f32", f, VT.FLOAT32, V(VT.FLOAT32, f32bits(f)))
    add("t.bool", True, VT.BOOL, V(VT.BOOL, True))
    add("t.str", "héllo ✓ 世界", VT.STRING, V(VT.STRING, "héllo ✓ 世界"))
    add("t.u64", 2**63 + 12345, VT.UINT64, V(VT.UINT64, 2**63 + 12345))
    add("t.i64", -(2**62) - 7, VT.INT64, V(VT.INT64, -(2**62) - 7))
    d = float(rng.normal())
    add("t.f64", d, VT.FLOAT64, V(VT.FLOAT64, f64bits(d)))
    toks = ["<s>", "</s>", "▁the", "", "a b", "\n"]
    add("t.arr_str", toks, VT.ARRAY, V(VT.ARRAY, [V(VT.STRING, s) for s in toks]))
    fl = [float(np.float32(x)) for x in rng.normal(size=5)]
    add("t.arr_f32", fl, VT.ARRAY, V(VT.ARRAY, [V(VT.FLOAT32, f32bits(x)) for x in fl]), VT.FLOAT32)
    ints = [int(x) for x in rng.integers(-1000, 1000, 7)]
    add("t.arr_i32", ints, VT.ARRAY, V(VT.ARRAY, [V(VT.INT32, x) for x in ints]), VT.INT32)
    u8s = [int(x) for x in rng.integers(0, 256, 9)]
    add("t.arr_u8", u8s, VT.ARRAY, V(VT.ARRAY, [V(VT.UINT8, x) for x in u8s]), VT.UINT8)
    nested = [[1, 2, 3], [4], [5, 6]]
    add("t.arr_nested", nested, VT.ARRAY,
        V(VT.ARRAY, [V(VT.ARRAY, [V(VT.INT32, x) for x in inner]) for inner in nested]))
    bools = [True, False, True]
    add("t.arr_bool", bools, VT.ARRAY, V(VT.ARRAY, [V(VT.BOOL, b) for b in bools]))
    w.add_custom_alignment(ALIGN)
    meta.append({"key": "general.alignment", "value": V(VT.UINT32, ALIGN)})

    tensors = []

    def tensor(name, arr, raw_dtype=None, dims=None, type_id=None):
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
        tensors.append({
            "name": name,
            "type": int(type_id),
            "dims": dims if dims is not None else [int(s) for s in reversed(arr.shape)],
            "data": np.ascontiguousarray(arr).tobytes().hex(),
        })

    tensor("token_embd.weight", rng.normal(size=(3, 8)).astype(np.float32), type_id=T.F32)
    tensor("norm.weight", rng.normal(size=(7,)).astype(np.float32), type_id=T.F32)
    tensor("cube.weight", rng.normal(size=(2, 3, 4)).astype(np.float32), type_id=T.F32)
    tensor("half.weight", rng.normal(size=(4, 16)).astype(np.float16), type_id=T.F16)
    for name, qt, rows, cols in [("bf.weight", T.BF16, 2, 16), ("q8.weight", T.Q8_0, 2, 64),
                                 ("q4.weight", T.Q4_0, 3, 32), ("q4k.weight", T.Q4_K, 2, 256),
                                 ("q6k.weight", T.Q6_K, 1, 256)]:
        bs, ts = GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, (rows, cols // bs * ts), dtype=np.uint8)
        tensor(name, raw, raw_dtype=qt, dims=[cols, rows], type_id=qt)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(os.path.join(OUT, "python_written.json"), "w") as fh:
        json.dump({"version": 3, "alignment": ALIGN, "metadata": meta, "tensors": tensors}, fh, indent=1)
    print("wrote", path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
