#!/usr/bin/env bash
# The whole GPU check in one device call: flowgate-cuda's GPU tests, the CUDA parity tests of
# the engine (kernels, operations, every oracle fixture, Q8_0 and Q4_K models), and
# `flowgate bench decode --device cuda` on synthetic dense8b / moe30b models.
#
# Here (no Rust on the device machine):
#   cargo build --release -p flowgate
#   cargo test --release -p flowgate-cuda --test gpu --no-run
#   cargo test --release -p flowgate-engine --test cuda_parity --no-run
#   mkdir -p .devbin/cuda && strip --strip-debug -o .devbin/cuda/flowgate target/release/flowgate
#   strip --strip-debug -o .devbin/cuda/fg_cuda_gpu target/release/deps/gpu-<hash>
#   strip --strip-debug -o .devbin/cuda/fg_cuda_parity target/release/deps/cuda_parity-<hash>
# Device: run `tools/device/check.sh [tests] [dense8b] [moe30b] [vram] [split]` (default: the first
#   three; `vram` runs `bench moe --vram-budget` on moe30b, 3 and 8 GiB, both routings
#   (VRAM_BUDGETS, CPU_EXPERTS, ROUTINGS, RAM, COLD change that), and with SWEEP=1 a
#   uniform-routing sweep with its plot; PROFILE=1
#   adds a per-kernel decode profile, KEEP=1 keeps the synthetic models in /tmp; `split` runs
#   the GPU layer split: dense8b under SPLIT_BUDGETS, moe30b under MOE_SPLIT_BUDGET) with
#   carry [".devbin/cuda"]; logs land in $OUT.
set -u -o pipefail
OUT=${OUT:-/tmp/fg_out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export XDG_CACHE_HOME=/tmp/fg_cache
# The parity tests fail, rather than skip, when the CUDA backend does not start here.
export FLOWGATE_REQUIRE_CUDA=1
steps=${*:-tests dense8b moe30b}
BIN=${BIN:-.devbin/cuda}
rc=0
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader
} 2>&1 | tee "$OUT/env.log"

for step in $steps; do
  case $step in
    tests)
      T0=$(date +%s.%N)
      $BIN/flowgate synth --shape tiny --out /tmp/tiny.gguf >/dev/null 2>&1 &&
        $BIN/flowgate synth --shape tiny-moe --out /tmp/tiny-moe.gguf >/dev/null 2>&1 || echo "synth of tiny models failed"
      $BIN/fg_cuda_gpu --test-threads=1 2>&1 | tail -n 5 | tee "$OUT/cuda_crate.log" || rc=1
      FLOWGATE_Q4K_MODELS=/tmp/tiny.gguf,/tmp/tiny-moe.gguf \
        $BIN/fg_cuda_parity --nocapture --test-threads=1 2>&1 | tee "$OUT/parity.log" || rc=1
      echo "tests took $(awk "BEGIN{print $(date +%s.%N) - $T0}") s" | tee -a "$OUT/parity.log"
      ;;
    dense8b|moe30b)
      T0=$(date +%s.%N)
      $BIN/flowgate synth --shape "$step" --out "/tmp/$step.gguf" 2>&1 | tail -n 2
      T1=$(date +%s.%N)
      echo "synth $step: $(awk "BEGIN{print $T1 - $T0}") s, $(stat -c %s /tmp/$step.gguf) bytes" | tee "$OUT/bench_$step.log"
      $BIN/flowgate bench decode "/tmp/$step.gguf" --device cuda --reps 3 --json > "$OUT/bench_$step.json" 2>>"$OUT/bench_$step.log" || rc=1
      cat "$OUT/bench_$step.json"
      if [ -n "${PROFILE:-}" ]; then
        # Per-kernel device time of a 512-token prefill and 32 decode steps (events around
        # every launch).
        FLOWGATE_CUDA_PROFILE=1 $BIN/flowgate bench decode "/tmp/$step.gguf" --device cuda --reps 1 --gen 16 2>&1 |
          grep -A60 "prefill profile" | tee "$OUT/profile_$step.log"
      fi
      echo "bench $step total $(awk "BEGIN{print $(date +%s.%N) - $T0}") s" | tee -a "$OUT/bench_$step.log"
      [ -n "${KEEP:-}" ] || rm -f "/tmp/$step.gguf"
      ;;
    vram)
      T0=$(date +%s.%N)
      [ -f /tmp/moe30b.gguf ] || $BIN/flowgate synth --shape moe30b --out /tmp/moe30b.gguf 2>&1 | tail -n 1
      budgets=""
      for b in ${VRAM_BUDGETS:-3GiB 8GiB}; do budgets="$budgets --vram-budget $b"; done
      cpux=""
      for m in ${CPU_EXPERTS:-off auto}; do cpux="$cpux --cpu-experts $m"; done
      # RAM=SIZE: a RAM cache of that size over the file under the device cache (three
      # tiers); COLD=1 drops the file from the page cache after each prefill.
      [ -n "${RAM:-}" ] && cpux="$cpux --ram-budget $RAM"
      [ -n "${COLD:-}" ] && cpux="$cpux --cold"
      for routing in ${ROUTINGS:-router uniform}; do
        $BIN/flowgate bench moe /tmp/moe30b.gguf $budgets $cpux \
          --routing $routing --prompt 64 --gen 64 --policy ${POLICY:-lru} 2>&1 | tee "$OUT/vram_$routing.txt" || rc=1
      done
      # The CLI path: bench decode under a VRAM budget, with the placement explained.
      $BIN/flowgate bench decode /tmp/moe30b.gguf --device cuda --vram-budget 8GiB \
        ${RAM:+--ram-budget $RAM} --explain-placement \
        --reps 1 2>&1 | tail -n 16 | tee "$OUT/vram_bench_decode.txt" || rc=1
      if [ -n "${SWEEP:-}" ]; then
        $BIN/flowgate bench moe /tmp/moe30b.gguf --device cuda --steps 6 --routing uniform \
          --prompt 64 --gen 64 --plot "$OUT/bench_moe_moe30b.png" --json > "$OUT/vram_sweep.json" 2>&1 || rc=1
        cat "$OUT/vram_sweep.json" | grep -E '"(vram_budget_bytes|decode_tps|hit_rate|expert_fraction)"'
      fi
      echo "vram total $(awk "BEGIN{print $(date +%s.%N) - $T0}") s"
      ;;
    split)
      # The GPU layer split: dense8b under VRAM budgets too small for it (SPLIT_BUDGETS), next
      # to the whole model on the GPU and on the CPU alone; and moe30b under a budget below
      # its dense part (MOE_SPLIT_BUDGET), so that whole layers leave the GPU.
      T0=$(date +%s.%N)
      [ -f /tmp/dense8b.gguf ] || $BIN/flowgate synth --shape dense8b --out /tmp/dense8b.gguf 2>&1 | tail -n 1
      gen=${SPLIT_GEN:-32}
      {
        pp=${SPLIT_PROMPT:-512}
        echo "== dense8b whole on the GPU"
        $BIN/flowgate bench decode /tmp/dense8b.gguf --device cuda --reps 1 --prompt $pp --gen $gen 2>&1 | grep -E "^(prefill|decode)"
        for b in ${SPLIT_BUDGETS:-2GiB 3GiB 4GiB}; do
          echo "== dense8b --vram-budget $b"
          $BIN/flowgate bench decode /tmp/dense8b.gguf --device cuda --vram-budget $b \
            --explain-placement --reps 1 --prompt $pp --gen $gen 2>&1 | grep -vE "^ *$|INFO" || rc=1
        done
        # The prompt's CPU layers on the CPU (no prefill offload), to compare.
        echo "== dense8b --vram-budget 3GiB, FLOWGATE_PREFILL_OFFLOAD=0, pp64"
        FLOWGATE_PREFILL_OFFLOAD=0 $BIN/flowgate bench decode /tmp/dense8b.gguf --device cuda --vram-budget 3GiB \
          --reps 1 --prompt 64 --gen $gen 2>&1 | grep -E "^(prefill|decode)"
        echo "== dense8b on the CPU"
        $BIN/flowgate bench decode /tmp/dense8b.gguf --device cpu --reps 1 --prompt 64 --gen 16 2>&1 | grep -E "^(backend|prefill|decode)"
      } 2>&1 | tee "$OUT/split_dense8b.txt"
      [ -n "${KEEP:-}" ] || rm -f /tmp/dense8b.gguf
      if [ -n "${MOE_SPLIT_BUDGET:-}" ]; then
        [ -f /tmp/moe30b.gguf ] || $BIN/flowgate synth --shape moe30b --out /tmp/moe30b.gguf 2>&1 | tail -n 1
        $BIN/flowgate bench decode /tmp/moe30b.gguf --device cuda --vram-budget $MOE_SPLIT_BUDGET \
          --explain-placement --reps 1 --prompt 64 --gen $gen 2>&1 | grep -vE "^ *$" | tee "$OUT/split_moe30b.txt" || rc=1
      fi
      echo "split total $(awk "BEGIN{print $(date +%s.%N) - $T0}") s"
      ;;
    *) echo "unknown step $step"; rc=2 ;;
  esac
done
echo "check rc=$rc"
exit $rc
