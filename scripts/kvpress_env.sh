#!/usr/bin/env bash
# Install NVIDIA kvpress into a side folder (.kvpress) next to .venv.
#
# Why a side folder: kvpress 0.5.5 pins transformers<5.3 and its presses read
# kwargs["cache_position"] inside attention hooks, which newer transformers no
# longer pass (KeyError: 'cache_position' on .venv's transformers 5.23). We keep
# .venv untouched and shadow only the packages whose versions must differ, via
# `pip install --target` plus PYTHONPATH. torch (and everything else: numpy,
# datasets, safetensors, accelerate, ...) is reused from .venv, so every package
# is installed with --no-deps and pinned exactly.
#
# Why each pin (found by importing `transformers` and `kvpress` with .venv's
# packages and adding one package per failure):
#   kvpress 0.5.5            the baselines
#   transformers 5.2.0       newest release allowed by kvpress (<5.3)
#   huggingface_hub 1.33.0   transformers 5.2 checks hub>=1.3,<2.0 at import
#                            (.venv has 2.x); 1.33 also satisfies .venv's
#                            datasets (hub>=1.31), which kvpress imports
#   httpx 0.28.1, httpcore 1.0.9
#                            hub 1.x imports httpx (.venv only has httpx2)
#   tokenizers 0.22.2        transformers 5.2 checks tokenizers<=0.23.0 at import
#                            (.venv has 0.23.3)
#   cachetools 5.5.2         kvpress imports it at package import (<6 pinned)
#   fire 0.6.0, termcolor 3.3.0
#                            kvpress imports fire at package import (<0.7
#                            pinned); fire imports termcolor (six is in .venv)
#
# Usage (from anywhere):   bash scripts/kvpress_env.sh
# Then run with:           PYTHONPATH=.kvpress:build/python .venv/bin/python ...
# Idempotent: a stamp file records the pinned set; rerunning with the same set
# only re-checks the imports. Changing the set reinstalls from scratch.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
TARGET="$ROOT/.kvpress"
STAMP="$TARGET/.kvpress_env_stamp"

PKGS=(
  kvpress==0.5.5
  transformers==5.2.0
  huggingface_hub==1.33.0
  httpx==0.28.1
  httpcore==1.0.9
  tokenizers==0.22.2
  cachetools==5.5.2
  fire==0.6.0
  termcolor==3.3.0
)
WANT="$(printf '%s\n' "${PKGS[@]}")"

if [[ ! -x "$PY" ]]; then
  echo "error: $PY not found (create .venv first)" >&2
  exit 1
fi

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "kvpress env already installed in $TARGET"
else
  echo "installing into $TARGET:"
  printf '  %s\n' "${PKGS[@]}"
  # Start clean: `pip install --target` does not upgrade/remove in place.
  rm -rf "$TARGET"
  mkdir -p "$TARGET"
  # --no-deps keeps pip from pulling a second torch (and everything else).
  "$PY" -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "$TARGET" "${PKGS[@]}"
  printf '%s\n' "$WANT" > "$STAMP"
fi

# Check that the shadowing works: older transformers and kvpress come from
# .kvpress, torch from .venv.
cd "$ROOT"
OMP_NUM_THREADS=1 PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}" "$PY" - <<'EOF'
import importlib.metadata as md
import torch, transformers, kvpress, huggingface_hub, tokenizers
print("torch", torch.__version__, "from", torch.__file__)
print("transformers", transformers.__version__, "from", transformers.__file__)
print("kvpress", md.version("kvpress"), "from", kvpress.__file__)
print("huggingface_hub", huggingface_hub.__version__, "| tokenizers", tokenizers.__version__)
assert "/.kvpress/" in transformers.__file__, "transformers not taken from .kvpress"
assert "/.kvpress/" not in torch.__file__, "a second torch was installed"
EOF
echo "installed (dist-info in $TARGET):"
ls -d "$TARGET"/*.dist-info | xargs -n1 basename | sed 's/\.dist-info$//; s/^/  /'
