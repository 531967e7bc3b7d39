#!/usr/bin/env python3
"""Where a decode token goes, from an ncu CSV of an eager run.

On the device (no graphs, so every launch is a kernel ncu sees; caches and clocks as they are):
  FLOWGATE_CUDA_GRAPHS=0 ncu --metrics gpu__time_duration.sum,dram__bytes_read.sum \
      --cache-control none --clock-control none --csv \
      flowgate bench decode MODEL --device cuda --reps 1 --prompt 16 --gen 3 > ncu.csv
Here:
  python3 tools/device/ncu_by_kernel.py ncu.csv[.gz]
Prints, for the launches after the last `gather_rows` (the decode steps), time and DRAM bytes
per kernel name, then per mat-vec kernel and matrix size (the bytes a product reads tell the
matrices apart). Divide by the decode steps in the window (gen - 1) for per-token figures.
"""
import collections
import csv
import gzip
import sys

TIME = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
BYTES = {"B": 1, "byte": 1, "KB": 1e3, "Kbyte": 1e3, "MB": 1e6, "Mbyte": 1e6, "GB": 1e9, "Gbyte": 1e9}


def main(path):
    opener = gzip.open if path.endswith(".gz") else open
    lines = opener(path, "rt").read().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith('"ID"'))
    rows = list(csv.reader(lines[start:]))
    hdr = rows[0]
    col = {k: hdr.index(k) for k in ("ID", "Kernel Name", "Metric Name", "Metric Value", "Metric Unit")}
    kernels = {}
    for r in rows[1:]:
        if len(r) < len(hdr) or not r[col["ID"]].isdigit():
            continue
        k = kernels.setdefault(int(r[col["ID"]]), {"name": r[col["Kernel Name"]].split("(")[0]})
        k[r[col["Metric Name"]]] = (float(r[col["Metric Value"]].replace(",", "")), r[col["Metric Unit"]])
    ids = sorted(kernels)
    starts = [i for i, k in enumerate(ids) if kernels[k]["name"].startswith("gather_rows")]
    window = ids[starts[-1] + 1 if starts else 0:]
    by_name = collections.OrderedDict()
    by_matrix = collections.defaultdict(lambda: [0, 0.0])
    total_t = total_b = 0.0
    for i in window:
        k = kernels[i]
        t, tu = k["gpu__time_duration.sum"]
        b, bu = k["dram__bytes_read.sum"]
        t *= TIME[tu]
        b *= BYTES[bu]
        a = by_name.setdefault(k["name"], [0, 0.0, 0.0])
        a[0] += 1
        a[1] += t
        a[2] += b
        total_t += t
        total_b += b
        if k["name"].startswith("matvec"):
            m = by_matrix[(k["name"], round(b / 4e6) * 4)]
            m[0] += 1
            m[1] += t
    print(f"{'kernel':32s} {'calls':>5s} {'time us':>10s} {'DRAM MB':>9s}")
    for n, (c, t, b) in by_name.items():
        print(f"{n:32s} {c:5d} {t:10.1f} {b / 1e6:9.1f}")
    print(f"{'total':32s} {'':5s} {total_t:10.1f} {total_b / 1e6:9.1f}")
    print("\nmat-vecs by matrix size (MB read, rounded to 4):")
    for (n, mb), (c, t) in sorted(by_matrix.items()):
        print(f"{n:32s} ~{mb:4d} MB x{c:4d} {t / c:7.1f} us each")


if __name__ == "__main__":
    main(sys.argv[1])
