#!/usr/bin/env bash
# Makes a fresh machine ready to build and test mixsga:
#   * the Debian packages the build needs (installed only when missing),
#   * a virtualenv at .venv with the pinned torch and the Python packages of requirements.txt.
# Idempotent: a stamp holding the hash of requirements.txt (and requirements-nodeps.txt, installed with
# --no-deps) skips pip when nothing changed,
# so a second run takes about a second.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MIXSGA_VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3}"

APT_PACKAGES=(cmake make g++ python3-dev libgtest-dev libgmock-dev libbenchmark-dev jargon-text fortunes-min
              linux-doc-6.1 python3.11-doc)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "[bootstrap] installing Debian packages: ${missing[*]}"
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[bootstrap] creating virtualenv at $VENV"
  "$PYTHON_BIN" -m venv "$VENV"
fi

STAMP="$VENV/.mixsga-requirements.sha256"
want="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-nodeps.txt" | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$want" ]]; then
  echo "[bootstrap] installing Python packages (torch is ~3 GB the first time)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --progress-bar off -r "$ROOT/requirements.txt"
  "$VENV/bin/python" -m pip install --progress-bar off --no-deps -r "$ROOT/requirements-nodeps.txt"
  echo "$want" > "$STAMP"
fi
"$VENV/bin/python" -c "import torch; print(f'[bootstrap] ready: torch {torch.__version__} (CUDA {torch.version.cuda})')"
