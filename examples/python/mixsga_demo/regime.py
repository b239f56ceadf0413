"""`make study`: mixSGA against static GQA as a function of the uptraining budget, where the paper makes its
claim: a well-trained base, uptrained for 0.1-10 % of its own pretraining tokens.

The test-bed is the study's small Llama (8 KV heads; Debian's linux-doc-6.1 and python3.11-doc, held out by
document), trained from scratch for ``base_epochs`` epochs of the train split and cached with its held-out
curve. Every arm converts that base and is uptrained once per (budget, seed), each budget a separate run
with its own schedule (warm-up 1.5 %, cosine) at half the base's peak lr, as the paper uptrains TinyLlama
(2e-4 against its pretraining's 4e-4). The seed fixes the data order and the router initialisation, so
runs of one seed are paired. Budget 0 is the conversion point (no training). The run at the watched budget
(1 %) is also evaluated after 2, 4, 8, ... steps, and the longest run at the token counts of the shorter
budgets, to see where each arm's lead is won or lost.

Every evaluation reports held-out perplexity under expert-choice prefill (what ``model(ids, labels=ids)``
computes) and causal argmax routing (what decoding does), the realised decode routing, argmax/expert-choice
agreement and key scales. Runs are appended to <out>/runs.jsonl (and along-the-way points to
trajectory.jsonl) as they end; a run in progress is checkpointed at each evaluation point, so an interrupted
study resumes where it stopped. regime.md, regime.json, regime_crossover.png and regime_base_curve.png
summarise them: per budget, each mixSGA arm's paired difference to static GQA of its KV budget, ± SE.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from mixsga import hf
from mixsga.train.evaluate import perplexity
from mixsga.train.loop import TrainConfig, train

from .base_model import base_model_path, cached_base_model, read_curve, small_llama_config
from .reports import append_row, check_positive_finite, read_rows, settings_key
from .study import StudyArm, TestBed, build_data, evaluate, lr_multipliers, make_arm

#: Uptraining budgets, as a share of the base's pretraining tokens (0 = at conversion).
BUDGETS = (0.001, 0.003, 0.01, 0.03, 0.1)

_E1 = (("key_scale", "learned"),)
_EXT = (("key_scale", "learned"), ("routing_signal", "pooling_error"))

ARMS = (
    StudyArm("GQA-50%", "gqa", 0.5, kv_heads=4),
    StudyArm("GQA-25%", "gqa", 0.25, kv_heads=2),
    StudyArm("mixSGA paper 3:1:6 (50%)", "mixsga", 0.5, groups=(1, 2, 4), ratios=(0.3, 0.1, 0.6), family="paper"),
    StudyArm("mixSGA paper 1:3 (25%)", "mixsga", 0.25, groups=(2, 8), ratios=(1 / 3, 2 / 3), family="paper"),
    StudyArm("mixSGA E1 3:1:6 (50%)", "mixsga", 0.5, groups=(1, 2, 4), ratios=(0.3, 0.1, 0.6), options=_E1,
             prepare=True, family="E1"),
    StudyArm("mixSGA E1 1:3 (25%)", "mixsga", 0.25, groups=(2, 8), ratios=(1 / 3, 2 / 3), options=_E1,
             prepare=True, family="E1"),
    # The continuation study's best: E1-E3 with a mild mix (10 % of tokens promoted, 20 % demoted).
    StudyArm("mixSGA ext 1:7:2 (50%)", "mixsga", 0.5, groups=(1, 2, 4), ratios=(0.1, 0.7, 0.2), options=_EXT,
             prepare=True, family="E1-E3 mild mix"),
    StudyArm("mixSGA ext 1:7:2 (25%)", "mixsga", 0.25, groups=(2, 4, 8), ratios=(0.1, 0.7, 0.2), options=_EXT,
             prepare=True, family="E1-E3 mild mix"),
)

#: Attempts to keep mixSGA's conversion lead through uptraining (``--push``), at the budgets around the 1 %
#: target; compared with the same GQA runs. The router starts random (or warm-started, E3) and moves the
#: routing under the projections while they adapt: slow it down, or keep it where it started.
PUSH_BUDGETS = (0.003, 0.01, 0.03)
_MILD_25 = dict(groups=(2, 4, 8), ratios=(0.1, 0.7, 0.2), prepare=True, family="push")
_MILD_50 = dict(groups=(1, 2, 4), ratios=(0.1, 0.7, 0.2), prepare=True, family="push")
PUSH_ARMS = (
    StudyArm("push: ext 1:7:2 (25%), routers at lr x0.1", "mixsga", 0.25, options=_EXT,
             lr_multipliers=(("router", 0.1),), **_MILD_25),
    StudyArm("push: ext 1:7:2 (25%), routers frozen", "mixsga", 0.25, options=_EXT, frozen=("router",), **_MILD_25),
    # The mild mix with the paper's router and E1 only (E1 is the extension that helped everywhere).
    StudyArm("push: E1 1:7:2 (25%)", "mixsga", 0.25, options=_E1, **_MILD_25),
    StudyArm("push: ext 1:7:2 (50%), routers frozen", "mixsga", 0.5, options=_EXT, frozen=("router",), **_MILD_50),
    StudyArm("push: E1 3:1:6 (50%), routers frozen", "mixsga", 0.5, groups=(1, 2, 4), ratios=(0.3, 0.1, 0.6),
             options=_E1, prepare=True, family="push", frozen=("router",)),
)


@dataclasses.dataclass
class RegimeConfig(TestBed):
    """The uptraining-budget study: the base's pretraining and the uptraining runs."""

    base_batch: int = 16
    base_epochs: float = 1.0  #: ~18 tokens per parameter: about compute-optimal for 0.7 M parameters
    base_lr: float = 3e-3
    base_curve_every: int = 500  #: base steps between points of its held-out curve
    batch: int = 8  #: uptraining blocks per step: the 0.1 % budget still gets 12 steps
    lr_ratio: float = 0.5  #: uptraining peak lr / the base's peak lr (the paper: 2e-4 against 4e-4)
    budgets: tuple[float, ...] = BUDGETS
    watch_budget: float = 0.01  #: this budget's runs are also evaluated after 2, 4, 8, ... steps
    eval_blocks: int = 256  #: held-out blocks, spread evenly over the held-out documents

    @classmethod
    def quick(cls) -> RegimeConfig:
        return cls(hidden=32, layers=1, heads=4, kv_heads=4, intermediate=64, vocab=384, block=32, base_batch=4,
                   base_epochs=0.05, base_curve_every=10, batch=4, budgets=(0.05, 0.2), watch_budget=0.2,
                   eval_blocks=4, prepare_blocks=4, seeds=(0, 1), max_docs=40, tokenizer_chars=200_000)

    @property
    def uptrain_lr(self) -> float:
        return self.base_lr * self.lr_ratio


def quick_arms() -> tuple[StudyArm, ...]:
    """The arms for the quick configuration (4 KV heads: groups up to 4)."""
    return (
        StudyArm("GQA-50%", "gqa", 0.5, kv_heads=2),
        StudyArm("mixSGA paper 3:1:6 (50%)", "mixsga", 0.5, groups=(1, 2, 4), ratios=(0.3, 0.1, 0.6), family="paper"),
        StudyArm("mixSGA E1 3:1:6 (50%)", "mixsga", 0.5, groups=(1, 2, 4), ratios=(0.3, 0.1, 0.6), options=_E1,
                 prepare=True, family="E1"),
    )


def _log(msg: str) -> None:
    print(f"[regime {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def base_steps(cfg: RegimeConfig, n_train_blocks: int) -> int:
    return max(1, math.ceil(cfg.base_epochs * n_train_blocks / cfg.base_batch))


def uptrain_steps(cfg: RegimeConfig, budget: float, base_tokens: int) -> int:
    """Optimizer steps of ``batch`` blocks that see ``budget`` x the base's pretraining tokens."""
    return max(1, round(budget * base_tokens / (cfg.batch * cfg.block)))


def trajectory_points(cfg: RegimeConfig, budget: float, steps: int, base_tokens: int) -> list[int]:
    """Steps (before the last) at which a run of ``budget`` is evaluated along the way: 2, 4, 8, ... in
    the watched budget's runs; the shorter budgets' token counts in the longest budget's runs."""
    if budget == cfg.watch_budget:
        points = [2 ** k for k in range(1, 32) if 2 ** k < steps]
    elif budget == max(cfg.budgets):
        points = [uptrain_steps(cfg, b, base_tokens) for b in cfg.budgets if b < budget]
    else:
        points = []
    return sorted({p for p in points if 0 < p < steps})


def held_out_blocks(cfg: RegimeConfig, data) -> torch.Tensor:
    """``eval_blocks`` held-out blocks spread evenly over the held-out documents (not the first few)."""
    n = data.held_out.shape[0]
    return data.held_out[torch.linspace(0, n - 1, min(cfg.eval_blocks, n)).round().long()]


def _config_key(cfg: RegimeConfig) -> str:
    return settings_key(dataclasses.asdict(cfg))


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def _base(cfg: RegimeConfig, data, cache: Path, held: torch.Tensor):
    config = small_llama_config(cfg.vocab, cfg.hidden, cfg.intermediate, cfg.layers, cfg.heads, cfg.kv_heads,
                                cfg.block, use_cache=False)
    steps = base_steps(cfg, data.train.shape[0])
    model = cached_base_model(config, data, cache, steps, cfg.base_lr, cfg.base_batch, 0, _log,
                              curve_blocks=held, curve_every=cfg.base_curve_every)
    path = base_model_path(config, data, cache, steps, cfg.base_lr, cfg.base_batch, 0)
    return model, steps * cfg.base_batch * cfg.block, read_curve(path)


_WORKER: dict = {}


def _worker_init(out_dir: str, cfg: RegimeConfig, threads: int) -> None:
    """Loads the (cached) data and base model once per worker process."""
    torch.set_num_threads(threads)
    out = Path(out_dir)
    _, data, _ = build_data(cfg, out / "cache")
    held = held_out_blocks(cfg, data)
    base, base_tokens, _ = _base(cfg, data, out / "cache", held)
    _WORKER.update(cfg=cfg, data=data, base=base, base_tokens=base_tokens, held=held, out=out)


def _run_one(arm: StudyArm, seed: int, budget: float) -> dict:
    """One (arm, seed, budget): convert (and prepare), uptrain on its own schedule, evaluate."""
    cfg, data, base, base_tokens, held, out = (_WORKER[k] for k in ("cfg", "data", "base", "base_tokens", "held", "out"))
    key = _config_key(cfg)
    t0 = time.perf_counter()
    model, info = make_arm(base, arm, cfg, data, seed)
    ident = {"arm": arm.name, "seed": seed, "budget": budget, "config_key": key}
    steps = uptrain_steps(cfg, budget, base_tokens) if budget > 0 else 0
    if steps:
        ckpt = out / "ckpt" / f"{_slug(arm.name)}-s{seed}-b{budget}.pt"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tc = TrainConfig(steps=steps, batch_size=cfg.batch, lr=cfg.uptrain_lr, seed=100 + seed, progress=False,
                         checkpoint_path=str(ckpt),
                         lr_multipliers=lr_multipliers(model, cfg, arm))
        trajectory = out / "trajectory.jsonl"
        done = {r["step"] for r in read_rows(trajectory, key)
                if (r["arm"], r["seed"], r["budget"]) == (arm.name, seed, budget)}
        points = trajectory_points(cfg, budget, steps, base_tokens)
        for stop in points + [steps]:
            tc.stop_after = stop
            result = train(model, data, tc)
            if stop < steps and stop not in done:
                append_row(trajectory, {**ident, "step": stop, "tokens": stop * cfg.batch * cfg.block,
                                     "last_train_loss": result.losses[-1] if result.losses else None,
                                     **evaluate(model, arm, cfg, held)})
        ckpt.unlink(missing_ok=True)
    row = {**ident, "method": arm.method, "family": arm.family, "kv_budget": arm.budget, "steps": steps,
           "tokens": steps * cfg.batch * cfg.block, "seconds": time.perf_counter() - t0, **info,
           **evaluate(model, arm, cfg, held)}
    if arm.method == "mixsga":
        row.update(calibrated_decode(model, arm, cfg, data, held, seed))
    return row


def calibrated_decode(model, arm: StudyArm, cfg: RegimeConfig, data, held: torch.Tensor, seed: int) -> dict:
    """The decode budget causal argmax realises on the held-out blocks before and after
    ``hf.calibrate_decode_routing`` on ``prepare_blocks`` training blocks (more if the fit needs them: 100
    tokens per expert), and the held-out perplexity under causal argmax routing with the calibrated
    offsets (the model keeps them)."""
    n = max(cfg.prepare_blocks, math.ceil(100 * len(arm.groups) / cfg.block))
    g = torch.Generator().manual_seed(3000 + seed)
    calib = data.train[torch.randperm(data.train.shape[0], generator=g)[:n]]
    plain = hf.realised_kv_budget(model, held)
    fitted = hf.calibrate_decode_routing(model, calib)
    layers = hf.mixsga_layers(model)
    try:
        for layer in layers:
            layer.prefill_routing = "argmax"
        ppl = perplexity(model, held)
    finally:
        for layer in layers:
            layer.prefill_routing = "expert_choice"
    return {"decode_budget_plain": plain, "decode_budget_calibration_text": fitted,
            "decode_budget_calibrated": hf.realised_kv_budget(model, held), "ppl_argmax_calibrated": ppl}


def run(out_dir: Path, cfg: RegimeConfig, arms: tuple[StudyArm, ...] = ARMS, threads: int = 1,
        workers: int = 2, push: tuple[StudyArm, ...] = ()) -> dict:
    """Trains (or finds) the base, runs every (arm, seed, budget) not yet in <out>/runs.jsonl (``workers``
    processes of ``threads`` torch threads), then writes the report. ``push`` arms run at the
    ``PUSH_BUDGETS`` within ``cfg.budgets`` only."""
    import concurrent.futures
    import multiprocessing

    t_start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = out_dir / "cache"
    _, data, counts = build_data(cfg, cache)
    held = held_out_blocks(cfg, data)
    _log(f"data: {counts['tokens_train']:,} train / {counts['tokens_held_out']:,} held-out tokens; "
         f"{held.shape[0]} held-out blocks evaluated")
    torch.set_num_threads(threads * workers)  # the base trains alone: every core
    _, base_tokens, _ = _base(cfg, data, cache, held)
    torch.set_num_threads(threads)
    key = _config_key(cfg)
    runs_path = out_dir / "runs.jsonl"
    done = {(r["arm"], r["seed"], r["budget"]) for r in read_rows(runs_path, key)}
    # Seed by seed (an interrupted study still has paired seeds at every budget), longest runs first.
    todo = [(arm, seed, budget) for seed in cfg.seeds for budget in sorted((0.0,) + tuple(cfg.budgets), reverse=True)
            for arm in arms if (arm.name, seed, budget) not in done]
    todo += [(arm, seed, budget) for seed in cfg.seeds for budget in sorted(PUSH_BUDGETS, reverse=True)
             for arm in push if budget in cfg.budgets and (arm.name, seed, budget) not in done]
    _log(f"base: {base_tokens:,} tokens; uptraining budgets "
         + ", ".join(f"{100 * b:g} % = {uptrain_steps(cfg, b, base_tokens)} steps" for b in cfg.budgets)
         + f"; {len(done)} runs done, {len(todo)} to go ({workers} worker(s) x {threads} thread(s))")
    if todo:  # (workers load the data and the base: only start them when there is work)
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                                    initargs=(str(out_dir), cfg, threads)) as pool:
            futures = [pool.submit(_run_one, *task) for task in todo]
            for n, future in enumerate(concurrent.futures.as_completed(futures), start=1):
                row = future.result()
                append_row(runs_path, row)
                _log(f"run {n}/{len(todo)}: {row['arm']}, seed {row['seed']}, {100 * row['budget']:g} %: ppl EC "
                     f"{row['ppl_expert_choice']:.3f}, argmax {row['ppl_argmax']:.3f}, {row['seconds']:.0f} s")
    return report(out_dir, cfg, arms + push, counts, threads, workers, time.perf_counter() - t_start)


def report(out_dir: Path, cfg: RegimeConfig, arms: tuple[StudyArm, ...], counts: dict, threads: int, workers: int,
           wall: float) -> dict:
    """Writes regime.json, regime.md and the plots from the runs recorded so far."""
    from .regime_report import plot_base_curve, plot_crossover, render_markdown, summarise

    key = _config_key(cfg)
    rows = read_rows(out_dir / "runs.jsonl", key)
    trajectory = read_rows(out_dir / "trajectory.jsonl", key)
    _, data, _ = build_data(cfg, out_dir / "cache")
    config = small_llama_config(cfg.vocab, cfg.hidden, cfg.intermediate, cfg.layers, cfg.heads, cfg.kv_heads,
                                cfg.block, use_cache=False)
    steps = base_steps(cfg, data.train.shape[0])
    curve = read_curve(base_model_path(config, data, out_dir / "cache", steps, cfg.base_lr, cfg.base_batch, 0))
    result = summarise(rows, trajectory, arms, cfg)
    result.update({"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                   "threads": threads, "workers": workers, "torch": torch.__version__,
                   "config": dataclasses.asdict(cfg), "data": counts, "base_steps": steps,
                   "base_tokens": steps * cfg.base_batch * cfg.block, "base_curve": curve,
                   "uptrain_lr": cfg.uptrain_lr, "wall_seconds_this_call": wall,
                   "run_seconds_total": sum(r["seconds"] for r in rows)})
    (out_dir / "regime.json").write_text(json.dumps(result, indent=2))
    (out_dir / "regime.md").write_text(render_markdown(result))
    plot_crossover(result, out_dir / "regime_crossover.png")
    plot_base_curve(result, out_dir / "regime_base_curve.png")
    return result


def check(out_dir: Path) -> None:
    """Every output exists and every perplexity is finite (the CI check of --quick)."""
    for name in ("regime.md", "regime.json", "regime_crossover.png", "regime_base_curve.png", "runs.jsonl"):
        if not (out_dir / name).is_file() or (out_dir / name).stat().st_size == 0:
            raise RuntimeError(f"out: {out_dir / name} is missing or empty")
    result = json.loads((out_dir / "regime.json").read_text())
    check_positive_finite(result["cells"], ("ppl_expert_choice", "ppl_argmax"))
    if not result["base_curve"]:
        raise RuntimeError("regime.json: the base model's held-out curve is empty")
