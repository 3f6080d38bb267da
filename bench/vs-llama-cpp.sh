#!/usr/bin/env bash
# Side by side in one run: `ee bench` (plaintext and encrypted) against
# llama.cpp's `llama-bench`, on the same model, threads and machine, each
# cell measured back to back so that the machine's drift hits both alike.
# A benchmark, not a test: CI does not run it.
#
#   bench/vs-llama-cpp.sh [MODEL.gguf ...]
#
# Without arguments it benches every format of the issue's table, each made
# from the default SmolLM2 Q4_1 model with `ee quantize` (Q4_1 is the
# model itself) into bench/.cache/models/; EE_BENCH_FORMATS picks others
# (default "Q4_1 Q8_0 Q4_0 Q4_K_M Q5_K_M F16 BF16"; `ee quantize` has no BF16
# output, so BF16, llama.cpp's `-BF16.gguf`, is llama-quantize's conversion
# of the F16 file). One table per model. SmolLM2's
# rows of 576 are not whole K-quant super-blocks, so its Q4_K_M and Q5_K_M
# are mostly Q5_0 and Q5_1 (only ffn_down is Q4_K/Q5_K/Q6_K), as llama.cpp
# makes them.
#
# llama.cpp is built from the llama-cpp-python==0.3.36 sdist on PyPI (the
# same pin and sha256 as scripts/fetch-test-data.sh), with CMake from pip,
# into the git-ignored bench/.cache/. EE_BENCH_THREADS (2), EE_BENCH_REPS (3).
set -euo pipefail
cd "$(dirname "$0")/.."

DEFAULT_MODEL="models/SmolLM2-135M-Instruct.Q4_1.gguf"
FORMATS="${EE_BENCH_FORMATS:-Q4_1 Q8_0 Q4_0 Q4_K_M Q5_K_M F16 BF16}"
THREADS="${EE_BENCH_THREADS:-2}"
REPS="${EE_BENCH_REPS:-3}"
CACHE="bench/.cache"
SDIST_REQ="llama-cpp-python==0.3.36"
SDIST_FILE="llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_BENCH="$CACHE/llama.cpp/build/bin/llama-bench"
# Native, but without AMX: on the Xeon VM these benchmarks run on,
# ggml's AMX kernels (Q4_0, Q4_1, Q8_0 and K-quant matmuls) die on their
# first `tileloadd` (SIGILL, then SIGSEGV), though the CPU reports AMX and
# the kernel grants it. ee has no AMX kernels either. The flags are
# recorded with the build, which is redone when they change. (Other
# architectures' compilers do not know these flags.)
LLAMA_FLAGS=""
[ "$(uname -m)" != x86_64 ] || LLAMA_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
LLAMA_STAMP="$CACHE/llama.cpp/build/ee-build-flags"

# The venv with CMake (and the model, when it is the default one).
scripts/fetch-test-data.sh
VENV="models/.venv"
[ "$#" -gt 0 ] || [ -f "$DEFAULT_MODEL" ] ||
  cargo run --release --quiet -p ee-cli --bin ee -- fetch-model

if [ ! -x "$LLAMA_BENCH" ] || [ "$(cat "$LLAMA_STAMP" 2>/dev/null)" != "$LLAMA_FLAGS" ]; then
  mkdir -p "$CACHE"
  if [ ! -f "$CACHE/$SDIST_FILE" ]; then
    "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check \
      --no-deps --no-binary :all: --no-build-isolation --dest "$CACHE" "$SDIST_REQ"
  fi
  echo "$SDIST_SHA256  $CACHE/$SDIST_FILE" | sha256sum --check --quiet
  rm -rf "$CACHE/llama.cpp"
  tar -xzf "$CACHE/$SDIST_FILE" -C "$CACHE" "${SDIST_FILE%.tar.gz}/vendor/llama.cpp"
  mv "$CACHE/${SDIST_FILE%.tar.gz}/vendor/llama.cpp" "$CACHE/llama.cpp"
  rm -rf "$CACHE/${SDIST_FILE%.tar.gz}"
  PATH="$VENV/bin:$PATH" cmake -S "$CACHE/llama.cpp" -B "$CACHE/llama.cpp/build" \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DCMAKE_C_FLAGS="$LLAMA_FLAGS" -DCMAKE_CXX_FLAGS="$LLAMA_FLAGS" >/dev/null
  PATH="$VENV/bin:$PATH" cmake --build "$CACHE/llama.cpp/build" \
    --target llama-bench llama-server llama-quantize -j "$(nproc)" \
    >"$CACHE/llama-build.log" 2>&1 || { tail -20 "$CACHE/llama-build.log"; exit 1; }
  echo "$LLAMA_FLAGS" >"$LLAMA_STAMP"
fi
cargo build --release --quiet
EE="target/release/ee"

# llama-bench's mean tokens/s for one test (-p N -n 0, or -p 0 -n N -d D).
llama() {
  "$LLAMA_BENCH" -m "$MODEL" -t "$THREADS" -r "$REPS" -o json "$@" 2>/dev/null |
    python3 -c 'import json,sys; print("%.1f" % json.load(sys.stdin)[0]["avg_ts"])'
}
# ee bench's median prefill and decode tokens/s, plaintext then encrypted.
ee() {
  "$EE" bench --model "$MODEL" --threads "$THREADS" --reps "$REPS" "$@" |
    awk '/^plaintext/ {p = $2 " " $3} /^encrypted/ {e = $2 " " $3} END {print p, e}'
}
ratio() { python3 -c "print('%.2f' % ($1 / $2))"; }

# One table: every cell of the issue's goal, both engines back to back.
table() {
  echo "$(date -u +%Y-%m-%d), $(lscpu | sed -n 's/^Model name: *//p'), $THREADS threads, $(basename "$MODEL") ($("$EE" bench --model "$MODEL" --threads 1 --reps 1 --prompt-tokens 1 --gen-tokens 1 | sed -n 's/^model: .*weights \(.*\))$/\1/p'))"
  echo
  echo "| | ee plaintext | ee encrypted | llama.cpp | ratio (plaintext / llama.cpp) |"
  echo "|---|---|---|---|---|"
  for n in 128 512 2048; do
    l=$(llama -p "$n" -n 0)
    read -r pp _ ep _ <<<"$(ee --prompt-tokens "$n" --gen-tokens 1)"
    echo "| prefill, $n-token prompt | $pp | $ep | $l | $(ratio "$pp" "$l") |"
  done
  l=$(llama -p 0 -n 128)
  read -r _ pd _ ed <<<"$(ee --prompt-tokens 1 --gen-tokens 128)"
  echo "| decode, empty context | $pd | $ed | $l | $(ratio "$pd" "$l") |"
  l=$(llama -p 0 -n 128 -d 2048)
  read -r _ pd _ ed <<<"$(ee --prompt-tokens 2048 --gen-tokens 128)"
  echo "| decode after a 2048-token context | $pd | $ed | $l | $(ratio "$pd" "$l") |"
  echo
}

if [ "$#" -gt 0 ]; then
  for MODEL in "$@"; do table; done
  exit 0
fi
mkdir -p "$CACHE/models"
# Made by `ee quantize`, and remade whenever `ee` was rebuilt, so that its
# quantizer is the one benched.
made() {
  local out="$CACHE/models/SmolLM2-135M-Instruct.$1.gguf"
  if [ ! -f "$out" ] || [ "$EE" -nt "$out" ]; then
    "$EE" quantize --model "$DEFAULT_MODEL" --out "$out" --type "$1" >/dev/null
  fi
  echo "$out"
}
for format in $FORMATS; do
  case "$format" in
    Q4_1) MODEL="$DEFAULT_MODEL" ;;
    BF16)
      F16_MODEL=$(made F16)
      MODEL="$CACHE/models/SmolLM2-135M-Instruct.BF16.gguf"
      if [ ! -f "$MODEL" ] || [ "$F16_MODEL" -nt "$MODEL" ]; then
        "$(dirname "$LLAMA_BENCH")/llama-quantize" "$F16_MODEL" "$MODEL.tmp" BF16 \
          >"$CACHE/llama-quantize.log" 2>&1 || { tail -20 "$CACHE/llama-quantize.log"; exit 1; }
        mv "$MODEL.tmp" "$MODEL"
      fi
      ;;
    *) MODEL=$(made "$format") ;;
  esac
  table
done
