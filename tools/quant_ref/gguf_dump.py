#!/usr/bin/env python3
"""Dumps a GGUF file as JSON using the python `gguf` package's GGUFReader.

Used by flowgate's Rust tests to check that files written by flowgate's GgufWriter read back
identically in the reference implementation. Output format (also produced from the writer's
inputs by make_gguf_ref.py):

  {"version": 3, "alignment": 32,
   "metadata": [{"key": k, "value": V}, ...],          # file order, GGUF.* pseudo-keys skipped
   "tensors": [{"name": n, "type": ggml_id, "dims": [ne0, ne1, ...], "data": hex}, ...]}
  V = {"type": gguf_value_type_id, "value": x}; x is an int (f32/f64 given as their raw bit
  patterns so JSON keeps them exact), a string, a bool, or a list of V for arrays.

Usage: gguf_dump.py FILE
"""
import json
import sys

import numpy as np
from gguf import GGUFReader, GGUFValueType as VT


def walk(parts, i, vtype):
    """Rebuilds one value (nested arrays included) from the reader's flat parts list."""
    vtype = VT(int(vtype))
    if vtype == VT.STRING:
        return {"type": int(vtype), "value": bytes(parts[i + 1]).decode("utf-8")}, i + 2
    if vtype == VT.ARRAY:
        itype = int(parts[i][0])
        n = int(parts[i + 1][0])
        i += 2
        items = []
        for _ in range(n):
            v, i = walk(parts, i, itype)
            items.append(v)
        return {"type": int(vtype), "value": items}, i
    x = parts[i][0]
    if vtype == VT.FLOAT32:
        x = int(np.array([x], dtype=np.float32).view(np.uint32)[0])
    elif vtype == VT.FLOAT64:
        x = int(np.array([x], dtype=np.float64).view(np.uint64)[0])
    elif vtype == VT.BOOL:
        x = bool(x)
    else:
        x = int(x)
    return {"type": int(vtype), "value": x}, i + 1


def dump(path):
    r = GGUFReader(path)
    meta = []
    version = None
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            if name == "GGUF.version":
                version = int(f.parts[-1][0])
            continue
        v, end = walk(f.parts, 3, f.types[0])
        assert end == len(f.parts), name
        meta.append({"key": name, "value": v})
    tensors = []
    for t in r.tensors:
        tensors.append({
            "name": t.name,
            "type": int(t.tensor_type),
            "dims": [int(d) for d in t.shape],
            "data": np.ascontiguousarray(t.data).tobytes().hex(),
        })
    return {"version": version, "alignment": int(r.alignment), "metadata": meta, "tensors": tensors}


if __name__ == "__main__":
    json.dump(dump(sys.argv[1]), sys.stdout)
