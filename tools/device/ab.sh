#!/usr/bin/env bash
# A/B of environment switches in one device call: for each model, runs
# `flowgate bench decode --reps $REPS` (default 1) under each setting in turn, ROUNDS times (A B A B ...), so
# lease-to-lease variance (up to 10% on the H100 leases) does not enter the comparison.
# Usage: MODELS="dense8b moe30b" ROUNDS=2 tools/device/ab.sh "A=1" "A=0" ["B=4" ...]
#   each argument is a space-separated list of VAR=value set for that run ("-" for none).
# Models are synthesised into /tmp if absent. Output: one line per run, "model setting tok/s".
set -u -o pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-/tmp/fg_cache}
BIN=${BIN:-.devbin/cuda}
for m in ${MODELS:-dense8b}; do
  [ -f "/tmp/$m.gguf" ] || $BIN/flowgate synth --shape "$m" --out "/tmp/$m.gguf" >/dev/null 2>&1
done
for r in $(seq "${ROUNDS:-2}"); do
  for m in ${MODELS:-dense8b}; do
    for setting in "$@"; do
      vars=()
      [ "$setting" = "-" ] || read -r -a vars <<<"$setting"
      line=$(env "${vars[@]}" $BIN/flowgate bench decode "/tmp/$m.gguf" --device cuda --reps "${REPS:-1}" \
        ${BENCH_ARGS:-} --json 2>/dev/null |
        python3 -c 'import json,sys; d=json.load(sys.stdin); print("pp %.1f tg %.1f" % (d["prefill_tps"], d["decode_tps"]))' 2>&1)
      echo "round $r $m [$setting] $line"
    done
  done
done
