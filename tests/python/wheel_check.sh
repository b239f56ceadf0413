#!/usr/bin/env bash
# What `pip install --no-build-isolation .` gives a user, checked without touching the venv:
# builds the wheel (scikit-build-core, the project's CMake), installs it into a scratch directory,
# and runs the pytest suite against that installed copy from outside the source tree, so the package
# must find its own libmixsga (rpath $ORIGIN) and nothing from the build tree.
#   usage: wheel_check.sh <python> <source dir> <scratch dir>
set -euo pipefail
python="$1"; source_dir="$2"; scratch="$3"
rm -rf "$scratch"
mkdir -p "$scratch/wheel" "$scratch/site"
export PATH="$(dirname "$python"):$PATH"
"$python" -m pip wheel --no-build-isolation --no-deps -q -w "$scratch/wheel" "$source_dir"
"$python" -m pip install --no-deps -q --target "$scratch/site" "$scratch"/wheel/mixsga-*.whl
cd "$scratch"
PYTHONPATH="$scratch/site" "$python" - <<'PY'
import os, mixsga, torch
assert mixsga.library_path().startswith(os.path.dirname(mixsga.__file__)), mixsga.library_path()
assert mixsga.cmake_prefix_path and os.path.isfile(
    os.path.join(mixsga.cmake_prefix_path, "lib", "cmake", "mixsga", "mixsgaConfig.cmake"))
layer = mixsga.nn.MixSGAAttention(64, 8, 4)
print("installed mixsga:", mixsga.__file__, "->", mixsga.library_path(), tuple(layer(torch.randn(1, 5, 64))[0].shape))
PY
PYTHONPATH="$scratch/site" "$python" -m pytest "$source_dir/tests/python" -q -k "not inductor"
