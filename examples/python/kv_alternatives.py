"""At equal KV bytes, what users would pick instead of mixSGA: quantized KV caches (int8 / int4 / int2), kvpress
presses (SnapKV, ExpectedAttention, Knorm), static GQA, and mixSGA at conversion and after a short uptraining, on
SmolLM2-135M (offline GGUF) and the regime study's test-bed (8 KV heads), at about 50 % and 25 % of the full
KV bytes. The protocol and the methods are in mixsga_demo/kv_alternatives.py.

    PYTHONPATH=build/python:examples/python OMP_NUM_THREADS=1 .venv/bin/python examples/python/kv_alternatives.py \\
        --out out/kv_alternatives --testbed-cache out/regime/cache

Writes <out>/rows.jsonl (one row per model, method, target and seed; resumable), kv_alternatives.md, .json and
the plot (--plot, default <out>/kv_alternatives.png). The kvpress presses run through
examples/python/mixsga_demo/kvpress_runner.py in the .kvpress environment (scripts/kvpress_env.sh) when it
exists; otherwise a row says why they did not run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from mixsga_demo import kv_alternatives  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default out/kv_alternatives, "
                   "out/kv_alternatives-quick with --quick)")
    p.add_argument("--models", default="testbed,smollm2", help="comma-separated: smollm2, testbed")
    p.add_argument("--quick", action="store_true", help="a tiny configuration (smoke test, < 2 min)")
    p.add_argument("--plot", default=None, help="plot path (default <out>/kv_alternatives.png)")
    p.add_argument("--testbed-cache", default="out/regime/cache",
                   help="the regime study's cache folder (its data and trained base; trained there if missing)")
    p.add_argument("--no-kvpress", action="store_true", help="do not call the kvpress runner")
    p.add_argument("--kvpress-python", default=None, help="interpreter for the runner (default this one)")
    p.add_argument("--kvpress-env", default=".kvpress",
                   help="the runner's packages (scripts/kvpress_env.sh installs them; default .kvpress)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--check", action="store_true",
                   help="fail unless every method ran with finite figures (and kvpress, unless --no-kvpress)")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in kv_alternatives.MODEL_KEYS]
    if unknown or not models:
        p.error(f"--models: expected names from {sorted(kv_alternatives.MODEL_KEYS)}, got {args.models!r}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # SmolLM2 comes from the local GGUF file
    torch.set_num_threads(args.threads)
    out = Path(args.out or ("out/kv_alternatives-quick" if args.quick else "out/kv_alternatives"))
    rows = kv_alternatives.run(out, models, quick=args.quick, plot_path=Path(args.plot) if args.plot else None,
                               testbed_cache=Path(args.testbed_cache), kvpress=not args.no_kvpress,
                               kvpress_python=args.kvpress_python, kvpress_env=Path(args.kvpress_env))
    print((out / "kv_alternatives.md").read_text())
    if args.check:
        problems = kv_alternatives.check(rows, kvpress=not args.no_kvpress)
        if problems:
            print("check failed:\n  " + "\n  ".join(problems))
            return 1
        print("check passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
