"""`make study`: mixSGA (as in the paper, and with the quality extensions) against static GQA, several
seeds, on Debian's linux-doc and python docs.

By default, the uptraining-budget study (mixsga_demo/regime.py): a well-trained base uptrained for 0.1-10 %
of its pretraining tokens; writes <out>/regime.md, regime.json, regime_crossover.png, regime_base_curve.png
(default out: out/regime). --continuation: the long-continuation study at equal KV budgets
(mixsga_demo/study.py; 125 % of a short base's pretraining); writes report.md, report.json, ppl_vs_kv.png
(default out: out/study). --smollm2-conversion: SmolLM2-135M at conversion; --smollm2-uptrain: SmolLM2-135M
uptrained for 48 steps with held-out perplexity along the way (mixsga_demo/smollm2_uptrain.py).

Usage: python examples/python/study.py [--continuation] [--quick] [--out DIR] [--threads 1] [--workers 2]
                                       [--seeds 0 1 2] [--arm-steps N] [--base-steps N] [--check]
Runs are appended to <out>/runs.jsonl as they end: an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing the study does may reach a model hub

from mixsga_demo import regime  # noqa: E402
from mixsga_demo.study import ARMS, StudyConfig, check, quick_arms, run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--continuation", action="store_true",
                        help="the long-continuation study (125 %% of a short base's pretraining) instead")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few steps (the CI smoke run)")
    parser.add_argument("--push", action="store_true",
                        help="also the attempts to keep mixSGA's conversion lead (regime.PUSH_ARMS, 0.3-3 %%)")
    parser.add_argument("--out", default=None, help="output folder (default out/study, out/study-quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, one process each (default 2)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2)")
    parser.add_argument("--arm-steps", type=int, default=None,
                        help="--continuation: continued steps per arm (default 960)")
    parser.add_argument("--base-steps", type=int, default=None,
                        help="--continuation: from-scratch base steps (default 800)")
    parser.add_argument("--check", action="store_true", help="verify the outputs after the run")
    parser.add_argument("--smollm2-conversion", action="store_true",
                        help="instead: SmolLM2-135M at conversion, static baseline vs mixSGA with each extension")
    parser.add_argument("--smollm2-uptrain", action="store_true",
                        help="instead: SmolLM2-135M uptrained 48 steps (bf16), held-out ppl along the way "
                             "(mixsga_demo/smollm2_uptrain.py; seeds default 0 1)")
    args = parser.parse_args()
    for flag in ("threads", "workers"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag}: must be >= 1, got {getattr(args, flag)}")
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: must be distinct, got {args.seeds}")
    if args.smollm2_uptrain:
        from mixsga_demo import smollm2_uptrain

        argv = ["--threads", str(args.threads)] + (["--quick"] if args.quick else []) + (["--check"] if args.check else [])
        argv += ["--out", args.out] if args.out else []
        argv += ["--seeds", *map(str, args.seeds)] if args.seeds else []
        return smollm2_uptrain.main(argv)
    if not args.continuation and not args.smollm2_conversion:
        for flag in ("arm_steps", "base_steps"):
            if getattr(args, flag) is not None:
                parser.error(f"--{flag.replace('_', '-')}: only with --continuation")
        rcfg = regime.RegimeConfig.quick() if args.quick else regime.RegimeConfig()
        if args.seeds is not None:
            rcfg.seeds = tuple(args.seeds)
        out = Path(args.out or ("out/regime-quick" if args.quick else "out/regime"))
        push = regime.PUSH_ARMS if args.push and not args.quick else ()
        regime.run(out, rcfg, regime.quick_arms() if args.quick else regime.ARMS, args.threads, args.workers, push)
        print((out / "regime.md").read_text())
        if args.check:
            regime.check(out)
            print("check passed")
        return 0
    cfg = StudyConfig.quick() if args.quick else StudyConfig()
    if args.seeds is not None:
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
