#!/usr/bin/env bash
# Installs mixsga into a scratch prefix, builds examples/cpp/standalone against it with
# find_package(mixsga), and runs the result: what a LibTorch user does. The README's C++ snippets
# marked <!-- snippet: cpp-layer --> / <!-- snippet: cpp-generate --> (the HTML comment on the line
# before the ```cpp fence) are compiled and run too, as the README has them (readme_snippets.cpp); a
# README without those markers builds the quickstart alone.
set -euo pipefail
build_dir="$1"; source_dir="$2"; python="$3"
prefix="$build_dir/_find_package_test/prefix"
work="$build_dir/_find_package_test/build"
snippets="$build_dir/_find_package_test/readme"
rm -rf "$prefix" "$work" "$snippets"
cmake --install "$build_dir" --prefix "$prefix" > /dev/null
torch_prefix="$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')"

# README.md -> $snippets/readme_{includes,cpp_layer,cpp_generate}.inc; prints how many blocks it found.
marked="$("$python" - "$source_dir/README.md" "$snippets" <<'PY'
import os
import re
import sys

readme, out = sys.argv[1], sys.argv[2]
names = {"cpp-layer": "readme_cpp_layer.inc", "cpp-generate": "readme_cpp_generate.inc"}
lines = open(readme, encoding="utf-8").read().splitlines()
bodies = {name: [] for name in names}
includes = []
count = 0
marker = re.compile(r"^\s*<!--\s*snippet:\s*([\w-]+)\s*-->\s*$")
for i, line in enumerate(lines):
    m = marker.match(line)
    if not m or not m.group(1).startswith("cpp-"):
        continue  # Python snippets are tests/python/test_readme.py's
    name = m.group(1)
    if name not in names:
        sys.exit(f"README.md:{i + 1}: unknown C++ snippet marker {name!r} (known: {', '.join(names)})")
    j = i + 1
    while j < len(lines) and not lines[j].strip():
        j += 1
    if j == len(lines) or lines[j].strip() != "```cpp":
        sys.exit(f"README.md:{i + 1}: the marker {name!r} must be followed by a ```cpp block")
    end = j + 1
    while end < len(lines) and lines[end].strip() != "```":
        end += 1
    if end == len(lines):
        sys.exit(f"README.md:{j + 1}: the ```cpp block of {name!r} is not closed")
    count += 1
    # #line directives: compiler errors name README.md and its line numbers.
    last = {}
    for k in range(j + 1, end):
        target = includes if lines[k].lstrip().startswith("#include") else bodies[name]
        if last.get(id(target)) != k - 1:
            target.append(f'#line {k + 1} "{os.path.abspath(readme)}"')
        target.append(lines[k])
        last[id(target)] = k
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "readme_includes.inc"), "w") as f:
    f.write("\n".join(includes) + "\n")
for name, file in names.items():
    with open(os.path.join(out, file), "w") as f:
        f.write("\n".join(bodies[name]) + "\n")
print(count)
PY
)"
readme_args=()
if [[ "$marked" != 0 ]]; then
  echo "README.md: $marked marked C++ snippet(s), built as examples/cpp/standalone/readme_snippets.cpp"
  readme_args=(-DMIXSGA_README_SNIPPETS="$snippets")
fi

generator=()
command -v ninja > /dev/null && generator=(-G Ninja)
cmake -S "$source_dir/examples/cpp/standalone" -B "$work" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$prefix;$torch_prefix" "${readme_args[@]}" > "$work.log" 2>&1 || { cat "$work.log"; exit 1; }
cmake --build "$work" > "$work.build.log" 2>&1 || { cat "$work.build.log"; exit 1; }
# ctest passes on the quickstart's last line (PASS_REGULAR_EXPRESSION, which overrides the exit status),
# so that output is held back until the README snippets have run too: a failing snippet fails the test.
quickstart_out="$("$work/quickstart" 2>&1)" || { echo "$quickstart_out"; exit 1; }
if [[ "$marked" != 0 ]]; then
  "$work/readme_snippets"
fi
echo "$quickstart_out"
