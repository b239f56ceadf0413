#!/usr/bin/env bash
# Installs mixsga into a scratch prefix, builds examples/cpp/standalone against it with
# find_package(mixsga), and runs the result: what a LibTorch user does.
set -euo pipefail
build_dir="$1"; source_dir="$2"; python="$3"
prefix="$build_dir/_find_package_test/prefix"
work="$build_dir/_find_package_test/build"
rm -rf "$prefix" "$work"
cmake --install "$build_dir" --prefix "$prefix" > /dev/null
torch_prefix="$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
generator=()
command -v ninja > /dev/null && generator=(-G Ninja)
cmake -S "$source_dir/examples/cpp/standalone" -B "$work" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$prefix;$torch_prefix" > "$work.log" 2>&1 || { cat "$work.log"; exit 1; }
cmake --build "$work" > "$work.build.log" 2>&1 || { cat "$work.build.log"; exit 1; }
"$work/quickstart"
