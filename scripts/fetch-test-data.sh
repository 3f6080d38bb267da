#!/usr/bin/env bash
# Fetches the test data other projects wrote, into the git-ignored models/:
#   models/llama.cpp/  llama.cpp's vocabulary-only GGUFs with their .inp/.out
#                      tokenizer tests, and its real chat templates, from the
#                      llama-cpp-python sdist on PyPI (sha256-checked);
#   models/.venv/      a Python with jinja2, the chat-template oracle.
# (The default models, SmolLM2 and the all-MiniLM-L6-v2 encoder, are
# fetched by `ee fetch-model [--encoder]` and by the tests themselves.)
# Idempotent: a finished fetch is left alone. Needs only PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

SDIST_REQ="llama-cpp-python==0.3.36"
SDIST_FILE="llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
DEST="models/llama.cpp"
VENV="models/.venv"
PYTHON="${EE_PYTHON:-python3}"
# jinja2 is the oracle; scikit-build-core and cmake are what pip needs to
# read the sdist's metadata without building it.
PACKAGES=("jinja2==3.1.6" "scikit-build-core==1.1.2" "cmake==4.4.5")
STAMP="$VENV/.ee-packages"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "${PACKAGES[*]}" ]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PACKAGES[@]}"
  echo "${PACKAGES[*]}" > "$STAMP"
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

if [ -f "$DEST/.sha256" ] && [ "$(cat "$DEST/.sha256")" = "$SDIST_SHA256" ]; then
  exit 0
fi
"$VENV/bin/python" -m pip download --quiet --disable-pip-version-check \
  --no-deps --no-binary :all: --no-build-isolation --dest "$tmp" "$SDIST_REQ"
echo "$SDIST_SHA256  $tmp/$SDIST_FILE" | sha256sum --check --quiet
tar -xzf "$tmp/$SDIST_FILE" -C "$tmp" "${SDIST_FILE%.tar.gz}/vendor/llama.cpp/models"
rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
mv "$tmp/${SDIST_FILE%.tar.gz}/vendor/llama.cpp/models" "$DEST"
echo "$SDIST_SHA256" > "$DEST/.sha256"
