#!/usr/bin/env bash
# Run flowgate-cuda's GPU tests on the device machine (no Rust there).
# Here:   cargo test -p flowgate-cuda --release --no-run
#         mkdir -p .devbin; cp target/release/deps/gpu-<hash> .devbin/fg_cuda_gpu
#         cp target/release/deps/flowgate_cuda-<hash> .devbin/fg_cuda_unit   (.devbin is in .git/info/exclude)
# Device: run tools/device/check_cuda.sh with carry [".devbin"]; logs land in $OUT.
set -u -o pipefail
OUT=${OUT:-/tmp/fg_out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export XDG_CACHE_HOME=/tmp/fg_cache
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  ls /usr/local/cuda/targets/x86_64-linux/lib | grep -E 'libnvrtc|libcublas\.' | tr '\n' ' '; echo
  ldconfig -p | grep -E 'libcuda\.so' | head -3
} 2>&1 | tee "$OUT/env.log"
rc=0
.devbin/fg_cuda_unit --test-threads=1 2>&1 | tee "$OUT/unit.log" || rc=1
.devbin/fg_cuda_gpu --nocapture --test-threads=1 2>&1 | tee "$OUT/gpu.log" || rc=1
echo "check_cuda rc=$rc"
exit $rc
