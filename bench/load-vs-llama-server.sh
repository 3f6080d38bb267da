#!/usr/bin/env bash
# The blind server under load, side by side in one run with llama.cpp's
# `llama-server -np 8`: the same model, threads, batch (8 sequences) and KV
# pool (8 x 4096 positions), each scenario run against both back to back.
# A benchmark, not a test: CI does not run it.
#
#   bench/load-vs-llama-server.sh [MODEL.gguf]
#
# Scenarios (`ee bench-server`, which streams and times every token):
#   1. 1, 8 and 32 concurrent streams of 128-token answers to 32-token
#      prompts, two rounds each;
#   2. the load mix: 8 such streams, and 4 prompts of 2048 tokens that
#      arrive half a second in. Long prefills must not starve the streams:
#      see ITL max.
# Then each server's peak resident memory (VmHWM).
#
# ee-server serves an encrypted artifact of the model, made here under a
# fresh key. llama-server comes from bench/vs-llama-cpp.sh's build, which
# this script runs first if needed. EE_BENCH_THREADS (2).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL="${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
THREADS="${EE_BENCH_THREADS:-2}"
CACHE="bench/.cache"
BIN="$CACHE/llama.cpp/build/bin"
SLOTS=8
SLOT_CTX=4096
EE_PORT=8131
LLAMA_PORT=8132

[ -x "$BIN/llama-server" ] || EE_BENCH_FORMATS=Q4_1 bench/vs-llama-cpp.sh >/dev/null
cargo build --release --quiet
EE="target/release/ee"

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

"$EE" encrypt-model --model "$MODEL" --server-out "$work/server.gguf" \
  --client-out "$work/bundle" >/dev/null

# The KV pool of llama-server's 8 slots, in MiB of our f16 cache (both
# engines' default element type).
kv_mib=$("$EE" bench --model "$MODEL" --threads 1 --reps 1 --prompt-tokens 1 \
  --gen-tokens 1 | sed -n 's/^kv cache: f16, \([0-9]*\) bytes per token$/\1/p')
kv_mib=$(((kv_mib * SLOTS * SLOT_CTX + (1 << 20) - 1) >> 20))

RAYON_NUM_THREADS="$THREADS" EE_MAX_BATCH=$SLOTS EE_KV_CACHE_MIB=$kv_mib \
  target/release/ee-server --model "$work/server.gguf" \
  --listen "127.0.0.1:$EE_PORT" >"$work/ee.log" 2>&1 &
pids+=($!)
ee_pid=$!
LD_LIBRARY_PATH="$BIN" "$BIN/llama-server" -m "$MODEL" -t "$THREADS" \
  -np $SLOTS -c $((SLOTS * SLOT_CTX)) --port $LLAMA_PORT >"$work/llama.log" 2>&1 &
pids+=($!)
llama_pid=$!
for port in $EE_PORT $LLAMA_PORT; do
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    sleep 0.2
  done
done

echo "$(date -u +%Y-%m-%d), $(lscpu | sed -n 's/^Model name: *//p'), $THREADS threads, $(basename "$MODEL"), batch $SLOTS, KV pool $SLOTS x $SLOT_CTX positions"
run() {
  for who in ee llama.cpp; do
    port=$EE_PORT
    [ "$who" = ee ] || port=$LLAMA_PORT
    echo "## $who"
    "$EE" bench-server --server "http://127.0.0.1:$port" "$@" | tail -n +2
  done
  echo
}
echo
echo "# streams of 128-token answers"
run --concurrency 1,8,32 --rounds 2
echo "# load mix: 8 streams and 4 prompts of 2048 tokens"
run --concurrency 8 --rounds 2 --long-prompts 4

hwm() { awk '/^VmHWM/ {printf "%.0f MiB", $2 / 1024}' "/proc/$1/status"; }
echo "# peak resident memory: ee-server $(hwm $ee_pid), llama-server $(hwm $llama_pid)"
