"""`make study`: mixSGA (as in the paper, and with the quality extensions) against static GQA at equal KV
budgets, several seeds, on Debian's linux-doc and python docs (see mixsga_demo/study.py).

Usage: python examples/python/study.py [--quick] [--out out/study] [--threads 1] [--workers 2]
                                       [--seeds 0 1 2]
                                       [--arm-steps N] [--check]
Runs are appended to <out>/runs.jsonl as they end: an interrupted study resumes where it stopped.
Writes <out>/report.md, report.json and ppl_vs_kv.png.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing the study does may reach a model hub

from mixsga_demo.study import ARMS, StudyConfig, check, quick_arms, run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few steps (the CI smoke run)")
    parser.add_argument("--out", default=None, help="output folder (default out/study, out/study-quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, one process each (default 2)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2)")
    parser.add_argument("--arm-steps", type=int, default=None, help="continued steps per arm (default 960)")
    parser.add_argument("--base-steps", type=int, default=None, help="from-scratch base steps (default 800)")
    parser.add_argument("--check", action="store_true", help="verify the outputs after the run")
    parser.add_argument("--smollm2-conversion", action="store_true",
                        help="instead: SmolLM2-135M at conversion, static baseline vs mixSGA with each extension")
    args = parser.parse_args()
    for flag in ("threads", "workers"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag}: must be >= 1, got {getattr(args, flag)}")
    cfg = StudyConfig.quick() if args.quick else StudyConfig()
    if args.seeds is not None:
        if len(set(args.seeds)) != len(args.seeds):
            parser.error(f"--seeds: must be distinct, got {args.seeds}")
        cfg.seeds = tuple(args.seeds)
    for flag in ("arm_steps", "base_steps"):
        value = getattr(args, flag)
        if value is not None:
            if value < 1:
                parser.error(f"--{flag.replace('_', '-')}: must be >= 1, got {value}")
            setattr(cfg, flag, value)
    out = Path(args.out or ("out/study-quick" if args.quick else "out/study"))
    if args.smollm2_conversion:
        from mixsga_demo import smollm2_conversion

        smollm2_conversion.run(out, seeds=cfg.seeds, threads=args.threads)
        print((out / "smollm2_conversion.md").read_text())
        return 0
    run(out, cfg, quick_arms() if args.quick else ARMS, args.threads, args.workers)
    print((out / "report.md").read_text())
    if args.check:
        check(out)
        print("check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
