"""Every ```python block of README.md runs as written, each in a fresh interpreter.

Markers (an HTML comment on the line before the opening fence; blank lines between are allowed):

- ``<!-- not-run: reason -->``: the block is not run (it needs a GPU, a download, a torchrun launch, ...);
  the reason is printed and becomes the skip reason.
- ``<!-- continues -->``: the block runs after the README's previous run block, in the same interpreter
  (for an example that the README splits with prose: it may use the names the earlier block defined).

Each block runs in a subprocess with cwd = a fresh temporary folder, HF_HUB_OFFLINE=1, OMP_NUM_THREADS=1,
the PYTHONPATH of this test (made absolute, with the mixsga package this test imports first) and a
timeout; its code is compiled with README.md's line numbers, so a traceback and the failure name the
README line. C++ blocks are compiled by the find_package_quickstart ctest (tests/cpp/find_package_test.sh,
markers ``<!-- snippet: cpp-layer -->`` and ``<!-- snippet: cpp-generate -->``).

Until the README carries any marker (not-run, continues or snippet), no block is run: its blocks were
written before this test and are reported as skipped, so the suite passes on such a README.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import mixsga

# MIXSGA_README: another file to check (a README being edited) instead of the repository's.
README = Path(os.environ.get("MIXSGA_README") or Path(__file__).resolve().parents[2] / "README.md").resolve()
TIMEOUT = float(os.environ.get("MIXSGA_README_TIMEOUT", "600"))  # seconds per snippet (chain)

_MARKER = re.compile(r"^\s*<!--\s*(not-run|continues|snippet)\s*(?::\s*(.*?))?\s*-->\s*$")
_FENCE = re.compile(r"^\s*```\s*([\w+-]*)")  # an opening fence and its language (an info string may follow)
_CLOSE = re.compile(r"^\s*```\s*$")


@dataclass
class Block:
    line: int  #: README line of the block's first code line (1-based)
    code: str
    skip: str | None = None  #: the not-run reason
    continues: bool = False


def extract(text: str) -> tuple[list[Block], bool]:
    """The ```python blocks of a Markdown text, and whether the text carries any snippet marker.

    Raises:
        ValueError: an unclosed fence, a not-run marker without a reason, or a marker that is not
            followed by a fenced block (naming the line).
    """
    lines = text.splitlines()
    blocks: list[Block] = []
    marked = False
    pending: tuple[int, str, str] | None = None  # (line, kind, argument) of a marker awaiting its fence
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _MARKER.match(line)
        if m:
            marked = True
            if m.group(1) == "not-run" and not (m.group(2) or "").strip():
                raise ValueError(f"README.md:{i + 1}: <!-- not-run: reason --> needs a reason")
            pending = (i + 1, m.group(1), (m.group(2) or "").strip())
            i += 1
            continue
        fence = _FENCE.match(line)
        if fence:
            end = i + 1
            while end < len(lines) and not _CLOSE.match(lines[end]):
                end += 1
            if end == len(lines):
                raise ValueError(f"README.md:{i + 1}: the ``` block opened here is not closed")
            if fence.group(1) == "python":
                block = Block(i + 2, "\n".join(lines[i + 1 : end]) + "\n")
                if pending and pending[1] == "not-run":
                    block.skip = pending[2]
                elif pending and pending[1] == "continues":
                    block.continues = True
                blocks.append(block)
            pending = None
            i = end + 1
            continue
        if pending and line.strip():
            raise ValueError(f"README.md:{pending[0]}: the marker must be followed by a ``` block, got {line!r}")
        i += 1
    if pending:
        raise ValueError(f"README.md:{pending[0]}: the marker must be followed by a ``` block")
    return blocks, marked


def chains(blocks: list[Block]) -> list[list[Block]]:
    """The runs to do: each run block with the blocks it continues (skipped blocks are in no chain)."""
    runs: list[list[Block]] = []
    for b in blocks:
        if b.skip is not None:
            continue
        if b.continues:
            if not runs:
                raise ValueError(f"README.md:{b.line - 1}: <!-- continues --> but no earlier block runs")
            runs.append(runs[-1] + [b])
        else:
            runs.append([b])
    return runs


# Runs in the subprocess: each block compiled with README.md's name and line numbers, so a traceback
# points at the README.
_RUNNER = """
import json, sys
path, blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for line, code in blocks:
    exec(compile("\\n" * (line - 1) + code, path, "exec"), namespace)
"""


def _env() -> dict:
    env = dict(os.environ)
    package_root = str(Path(mixsga.__file__).resolve().parents[1])  # the mixsga this suite tests
    paths = [package_root] + [str(Path(p).resolve()) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1")
    return env


def run_chain(chain: list[Block], readme: Path, workdir: Path, timeout: float = TIMEOUT) -> None:
    """Runs the chain's blocks in one fresh interpreter; fails naming the last block's README line."""
    spec = workdir / "snippet.json"
    spec.write_text(json.dumps([str(readme), [[b.line, b.code] for b in chain]]))
    where = f"{readme.name}:{chain[-1].line}"
    try:
        proc = subprocess.run([sys.executable, "-c", _RUNNER, str(spec)], cwd=workdir, env=_env(),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{where}: the snippet ran past the {timeout:.0f} s timeout", pytrace=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        pytest.fail(f"{where}: the README snippet failed (exit status {proc.returncode}):\n{tail}", pytrace=False)


def _params():
    blocks, marked = extract(README.read_text(encoding="utf-8"))
    params = []
    for b in blocks:
        if b.skip is not None:
            print(f"README.md:{b.line}: not run: {b.skip}")
            params.append(pytest.param(None, b.skip, id=f"README.md:{b.line}"))
    if not marked:
        return params + [pytest.param(None, "README.md carries no snippet markers yet (see this file's docstring)",
                                      id=f"README.md:{b.line}") for b in blocks if b.skip is None]
    return params + [pytest.param(chain, None, id=f"README.md:{chain[-1].line}") for chain in chains(blocks)]


@pytest.mark.parametrize("chain, skip", _params())
def test_readme_python_snippet(chain, skip, tmp_path):
    if skip is not None:
        pytest.skip(skip)
    run_chain(chain, README, tmp_path)


# ---- the harness itself (so a broken extractor cannot pass silently) ----

SAMPLE = """# Title

```python
x = 1
```

<!-- not-run: needs a GPU -->
```python
import cuda_only
```

<!-- continues -->

```python
assert x == 1
y = x + 1
```

```bash
echo not python
```

```python
raise RuntimeError("boom")
```
"""


def test_extract_finds_blocks_lines_and_markers():
    blocks, marked = extract(SAMPLE)
    assert marked
    assert [(b.line, b.skip, b.continues) for b in blocks] == [
        (4, None, False), (9, "needs a GPU", False), (15, None, True), (24, None, False)]
    assert blocks[2].code == "assert x == 1\ny = x + 1\n"
    assert [[b.line for b in c] for c in chains(blocks)] == [[4], [4, 15], [24]]
    assert extract("```python\nx = 1\n```\n") == ([Block(2, "x = 1\n")], False)
    assert extract('```python title="a.py"\nx = 1\n```\n```text\n```python\n```\n') == ([Block(2, "x = 1\n")], False)


def test_extract_rejects_malformed_markdown():
    with pytest.raises(ValueError, match=r"README.md:1: the ``` block opened here is not closed"):
        extract("```python\nx = 1\n")
    with pytest.raises(ValueError, match=r"README.md:1: <!-- not-run: reason --> needs a reason"):
        extract("<!-- not-run: -->\n```python\nx\n```\n")
    with pytest.raises(ValueError, match=r"README.md:1: the marker must be followed by a ``` block, got 'text'"):
        extract("<!-- continues -->\ntext\n```python\nx\n```\n")
    with pytest.raises(ValueError, match=r"README.md:2: <!-- continues --> but no earlier block runs"):
        chains(extract("<!-- continues -->\n```python\nx\n```\n")[0])


def test_a_failing_snippet_fails_with_its_readme_line(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(SAMPLE)
    blocks, _ = extract(SAMPLE)
    runs = chains(blocks)
    run_chain(runs[1], readme, tmp_path, timeout=120)  # the continued block sees x
    with pytest.raises(pytest.fail.Exception) as info:
        run_chain(runs[2], readme, tmp_path, timeout=120)
    message = str(info.value)
    assert message.startswith("README.md:24: the README snippet failed") and "boom" in message
    assert f'File "{readme}", line 24' in message  # the traceback names the README line
