"""`make demo`: what mixSGA buys at an equal KV budget, on your own CPU (python -m mixsga.train.demo logic).

Usage: python examples/python/demo.py [--quick] [--out out/demo] [--threads 2] [--check]
  --quick   a tiny model and a few steps (under 2 minutes; what CI runs)
  --check   after the run, verify that every output exists and every figure is finite
The base model and tokenizer are cached under <out>/cache, so a second run only redoes the arms.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mixsga.train.demo import DemoConfig, check, run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (CI smoke run)")
    parser.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--base-steps", type=int, default=None, help="steps of the from-scratch base model")
    parser.add_argument("--arm-steps", type=int, default=None, help="continued steps per arm")
    parser.add_argument("--aux-alpha", type=float, default=None, help="mixSGA aux-loss weight alpha")
    parser.add_argument("--check", action="store_true", help="verify the outputs after the run")
    args = parser.parse_args()
    if args.threads < 1:
        parser.error(f"--threads: must be >= 1, got {args.threads}")
    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    for flag, field in (("base_steps", "base_steps"), ("arm_steps", "arm_steps"), ("aux_alpha", "aux_alpha")):
        value = getattr(args, flag)
        if value is not None:
            if value < 0 or (field != "aux_alpha" and value < 1):
                parser.error(f"--{flag.replace('_', '-')}: must be positive, got {value}")
            setattr(cfg, field, value)
    out = Path(args.out)
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
