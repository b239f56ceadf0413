"""`make study`: mixSGA against static GQA at equal KV budgets, several seeds, on real technical prose.

A small Llama (8 KV heads, so pooling to 4, 2 or 1 heads keeps a clear loss) is trained from scratch on
Debian's linux-doc-6.1 and python3.11-doc reStructuredText (held out by document) and cached. Every arm
continues that same base for the same steps on the same data, once per seed (the seed sets the data
order and the router initialisation), and is evaluated on held-out documents:

- static GQA at 50 % and 25 % (mean-pooled heads, the paper's baseline), and the base itself;
- mixSGA as the paper specifies it (random router trained by its aux loss, mean-pooled keys);
- mixSGA with the quality extensions (docs/METHOD.md E1-E3): calibrated learned key scales, routing by
  pooling error, router warm start.

Per run: held-out perplexity with expert-choice and with causal argmax prefill, the realised argmax
(decode) routing ratios, the KV bytes per token they imply, and argmax/expert-choice agreement. Results
are appended to <out>/runs.jsonl as each run ends, so an interrupted study resumes where it stopped;
report.md, report.json and ppl_vs_kv.png summarise them (mean +- standard deviation over seeds, and
each arm's paired difference to the static baseline of its budget with its standard error).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from mixsga import hf
from mixsga.hf.prepare import capture_layer_inputs
from mixsga.train.data import TokenBlocks
from mixsga.train.evaluate import perplexity
from mixsga.train.loop import TrainConfig, train

from .base_model import cached_base_model, small_llama_config
from .corpus import tokenize_documents
from .reports import budget_axes, check_positive_finite, load_checked_report, mean_std, save_budget_plot, settings_key


@dataclasses.dataclass(frozen=True)
class StudyArm:
    """One arm. method: "base", "gqa" (``kv_heads`` mean-pooled heads) or "mixsga" (``groups``,
    ``ratios``, convert ``options``; ``prepare``: calibrate key scales and warm-start routers first;
    ``lr_multipliers``: its own lr for some parameters; ``frozen``: parameters not trained)."""

    name: str
    method: str
    budget: float  #: KV budget relative to the base (1.0 = full)
    kv_heads: int | None = None
    groups: tuple[int, ...] | None = None
    ratios: tuple[float, ...] | None = None
    options: tuple[tuple[str, object], ...] = ()
    prepare: bool = False
    family: str = ""  #: the curve it is plotted on ("paper", "extended"); "" for baselines
    #: extra lr multipliers by parameter-name substring (``TrainConfig.lr_multipliers``), e.g. slower routers
    lr_multipliers: tuple[tuple[str, float], ...] = ()
    frozen: tuple[str, ...] = ()  #: parameter-name substrings kept at their initial values (e.g. "router")

    def seeded(self) -> bool:
        return self.method != "base"


EXTENDED = (("key_scale", "learned"), ("routing_signal", "pooling_error"))

ARMS = (
    StudyArm("base (100%)", "base", 1.0),
    StudyArm("GQA-50%", "gqa", 0.5, kv_heads=4),
    StudyArm("GQA-25%", "gqa", 0.25, kv_heads=2),
    StudyArm("mixSGA paper 3:1:6 (50%)", "mixsga", 0.5, groups=(1, 2, 4), ratios=(0.3, 0.1, 0.6), family="paper"),
    StudyArm("mixSGA paper 1:3 (25%)", "mixsga", 0.25, groups=(2, 8), ratios=(1 / 3, 2 / 3), family="paper"),
    StudyArm("mixSGA ext 3:1:6 (50%)", "mixsga", 0.5, groups=(1, 2, 4), ratios=(0.3, 0.1, 0.6), options=EXTENDED,
             prepare=True, family="extended"),
    StudyArm("mixSGA ext 1:3 (25%)", "mixsga", 0.25, groups=(2, 8), ratios=(1 / 3, 2 / 3), options=EXTENDED,
             prepare=True, family="extended"),
    StudyArm("mixSGA ext 1:1 (75%)", "mixsga", 0.75, groups=(1, 2), ratios=(0.5, 0.5), options=EXTENDED,
             prepare=True, family="extended"),
    # E1 alone (calibrated, learned key scales) with the paper's router: what helped SmolLM2 at conversion.
    StudyArm("mixSGA E1 3:1:6 (50%)", "mixsga", 0.5, groups=(1, 2, 4), ratios=(0.3, 0.1, 0.6),
             options=(("key_scale", "learned"),), prepare=True, family="E1 only"),
    # Mild mixes: mostly the static baseline's group, 10 % of tokens promoted, 20 % demoted.
    StudyArm("mixSGA ext 1:7:2 (50%)", "mixsga", 0.5, groups=(1, 2, 4), ratios=(0.1, 0.7, 0.2), options=EXTENDED,
             prepare=True, family="extended, mild mix"),
    StudyArm("mixSGA ext 1:7:2 (25%)", "mixsga", 0.25, groups=(2, 4, 8), ratios=(0.1, 0.7, 0.2), options=EXTENDED,
             prepare=True, family="extended, mild mix"),
)

#: Each mixSGA arm's static baseline: the GQA arm of its budget.
BASELINES = {0.5: "GQA-50%", 0.25: "GQA-25%"}


@dataclasses.dataclass
class TestBed:
    """The test-bed's model sizes and data, shared by both studies (and its training recipe's extras)."""

    hidden: int = 128
    layers: int = 2
    heads: int = 8
    kv_heads: int = 8  #: 8 KV heads: pooling to 4, 2 or 1 heads keeps a clear loss
    intermediate: int = 384
    vocab: int = 2048
    block: int = 128
    key_scale_lr_multiplier: float = 20.0  #: learned key scales move ~lr per step: give them their own rate
    aux_alpha: float = 0.1
    prepare_blocks: int = 32
    seeds: tuple[int, ...] = (0, 1, 2)
    max_docs: int | None = None  #: cut the corpus (the quick configuration)
    tokenizer_chars: int = 8_000_000  #: train-split characters the tokenizer is trained on


@dataclasses.dataclass
class StudyConfig(TestBed):
    """The long-continuation study: a short base continued for ``arm_steps`` per arm."""

    batch: int = 16
    base_steps: int = 800
    base_lr: float = 3e-3
    arm_steps: int = 960  #: 8x the demo's continuation (2M tokens)
    arm_lr: float = 1e-3
    eval_blocks: int = 96

    @classmethod
    def quick(cls) -> StudyConfig:
        return cls(hidden=32, layers=1, heads=4, kv_heads=4, intermediate=64, vocab=384, block=32, batch=4,
                   base_steps=6, arm_steps=3, eval_blocks=4, prepare_blocks=4, seeds=(0, 1), max_docs=40,
                   tokenizer_chars=200_000)


def _log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def quick_arms() -> tuple[StudyArm, ...]:
    """The arms for the quick configuration (4 KV heads: groups up to 4)."""
    return (
        StudyArm("base (100%)", "base", 1.0),
        StudyArm("GQA-50%", "gqa", 0.5, kv_heads=2),
        StudyArm("mixSGA paper 3:1:6 (50%)", "mixsga", 0.5, groups=(1, 2, 4), ratios=(0.3, 0.1, 0.6), family="paper"),
        StudyArm("mixSGA ext 3:1:6 (50%)", "mixsga", 0.5, groups=(1, 2, 4), ratios=(0.3, 0.1, 0.6), options=EXTENDED,
                 prepare=True, family="extended"),
    )


def build_data(cfg: StudyConfig, cache_dir: Path):
    """(tokenizer, TokenBlocks with held-out documents as the held-out split, token counts)."""
    tok, train_ids, held_ids, counts = tokenize_documents(cfg.vocab, cfg.tokenizer_chars, cfg.max_docs, cache_dir)
    frac = held_ids.numel() / (train_ids.numel() + held_ids.numel())
    data = TokenBlocks(torch.cat([train_ids, held_ids]).long(), cfg.block, held_out_fraction=frac)
    return tok, data, counts


def build_base(cfg: StudyConfig, data: TokenBlocks, cache_dir: Path):
    config = small_llama_config(cfg.vocab, cfg.hidden, cfg.intermediate, cfg.layers, cfg.heads, cfg.kv_heads, cfg.block,
                                use_cache=False)
    return cached_base_model(config, data, cache_dir, cfg.base_steps, cfg.base_lr, cfg.batch, 0, _log)


def make_arm(base, arm: StudyArm, cfg: StudyConfig, data: TokenBlocks, seed: int):
    """(model, extra info) of one arm for one seed: the seed fixes the router initialisation."""
    model = copy.deepcopy(base)
    info = {}
    if arm.method == "gqa":
        hf.to_gqa(model, kv_heads=arm.kv_heads)
    elif arm.method == "mixsga":
        torch.manual_seed(1000 + seed)
        hf.convert(model, group_sizes=arm.groups, ratios=arm.ratios, aux_alpha=cfg.aux_alpha, **dict(arm.options))
        if arm.prepare:
            g = torch.Generator().manual_seed(2000 + seed)
            pick = torch.randperm(data.train.shape[0], generator=g)[: cfg.prepare_blocks]
            # E3 (the router fitted to the pooling-error ranking) goes with E2; an E1-only arm keeps the
            # paper's random router.
            steps = 200 if dict(arm.options).get("routing_signal") == "pooling_error" else 0
            prepared = hf.prepare(model, data.train[pick], router_steps=steps)
            info["key_scales_at_conversion"] = prepared["key_scales"]
            info["router_agreement_at_conversion"] = prepared["router_agreement"]
    for name, param in model.named_parameters():
        if any(part in name for part in arm.frozen):
            param.requires_grad_(False)
    return model, info


def evaluate(model, arm: StudyArm, cfg: StudyConfig, held: torch.Tensor) -> dict:
    row = {}
    layers = hf.mixsga_layers(model)
    for mode in ("expert_choice", "argmax"):
        for layer in layers:
            layer.prefill_routing = mode
        row[f"ppl_{mode}"] = perplexity(model, held)
        if not layers:
            break
    if not layers:
        row["ppl_argmax"] = row["ppl_expert_choice"]
        head_dim = cfg.hidden // cfg.heads
        kv = arm.kv_heads if arm.method == "gqa" else cfg.kv_heads
        row["kv_bytes_per_token"] = 2.0 * cfg.layers * kv * head_dim * 4
        return row
    for layer in layers:
        layer.prefill_routing = "expert_choice"
    inputs = capture_layer_inputs(model, held)
    agree, ratios = [], []
    for layer, inp in zip(layers, inputs):
        r = layer.routing_agreement(inp.hidden_states)
        agree.append(r.agreement)
        ratios.append(r.argmax_ratios)
    mean_ratios = torch.stack(ratios).mean(0)
    head_dim = cfg.hidden // cfg.heads
    per_layer = [sum(float(r[e]) * cfg.kv_heads / g for e, g in enumerate(arm.groups)) for r in ratios]
    row["agreement"] = sum(agree) / len(agree)
    row["decode_ratios"] = mean_ratios.tolist()
    # What the compact cache stores per token at decode under the realised argmax routing (fp32 K and V),
    # plus one expert index byte per token and layer.
    row["kv_bytes_per_token"] = sum(2.0 * h * head_dim * 4 + 1.0 for h in per_layer)
    row["decode_budget"] = sum(h / cfg.kv_heads for h in per_layer) / len(per_layer)
    scales = [layer.key_scales() for layer in layers]
    row["key_scales"] = [None if s is None else [round(float(v), 4) for v in s.detach()] for s in scales]
    return row


_WORKER: dict = {}


def _worker_init(out_dir: str, cfg: StudyConfig, threads: int) -> None:
    """Loads the (cached) data and base model once per worker process."""
    torch.set_num_threads(threads)
    cache = Path(out_dir) / "cache"
    _, data, _ = build_data(cfg, cache)
    _WORKER.update(cfg=cfg, data=data, base=build_base(cfg, data, cache))


def _run_one(arm: StudyArm, seed: int) -> dict:
    """One (arm, seed): convert/prepare, continue, evaluate. Returns the run's row."""
    cfg, data, base = _WORKER["cfg"], _WORKER["data"], _WORKER["base"]
    held = data.held_out[: cfg.eval_blocks]
    t0 = time.perf_counter()
    model, info = make_arm(base, arm, cfg, data, seed)
    if arm.method != "base":
        info["conversion_ppl"] = perplexity(model, held)
    result = train(model, data, TrainConfig(
        steps=cfg.arm_steps, batch_size=cfg.batch, lr=cfg.arm_lr, seed=100 + seed, description=arm.name,
        progress=False, lr_multipliers=lr_multipliers(model, cfg, arm)))
    return {"arm": arm.name, "seed": seed, "config_key": _config_key(cfg), "budget": arm.budget,
            "method": arm.method, "family": arm.family, "train_seconds": time.perf_counter() - t0,
            "final_train_loss": result.losses[-1], **info, **evaluate(model, arm, cfg, held)}


def run(out_dir: Path, cfg: StudyConfig, arms: tuple[StudyArm, ...] = ARMS, threads: int = 2,
        workers: int = 1) -> dict:
    """Runs every (arm, seed) not yet in <out>/runs.jsonl (``workers`` processes of ``threads`` torch
    threads each), then writes the report."""
    import concurrent.futures
    import multiprocessing

    t_start = time.perf_counter()
    torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = out_dir / "cache"
    _, data, counts = build_data(cfg, cache)
    _log(f"data: {counts['documents_train']} train / {counts['documents_held_out']} held-out documents "
         f"({', '.join(counts['sources'])}); {counts['tokens_train']:,} train / {counts['tokens_held_out']:,} held-out tokens")
    torch.set_num_threads(threads * workers)  # the base model trains alone: every core
    build_base(cfg, data, cache)  # trained (or found) once, before the workers load it
    torch.set_num_threads(threads)
    runs_path = out_dir / "runs.jsonl"
    done = set()
    if runs_path.is_file():
        for line in runs_path.read_text().splitlines():
            r = json.loads(line)
            if r.get("config_key") == _config_key(cfg):
                done.add((r["arm"], r["seed"]))
    todo = [(arm, seed) for seed in cfg.seeds for arm in arms
            if (arm.seeded() or seed == cfg.seeds[0]) and (arm.name, seed) not in done]
    _log(f"{len(done)} runs already done, {len(todo)} to go ({workers} worker(s) x {threads} thread(s))")
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                                initargs=(str(out_dir), cfg, threads)) as pool:
        futures = {pool.submit(_run_one, arm, seed): (arm, seed) for arm, seed in todo}
        for n, future in enumerate(concurrent.futures.as_completed(futures), start=1):
            row = future.result()
            with runs_path.open("a") as f:  # only this process writes: one line per finished run
                f.write(json.dumps(row) + "\n")
            _log(f"run {n}/{len(todo)} done: {row['arm']}, seed {row['seed']}: ppl EC {row['ppl_expert_choice']:.3f}, "
                 f"argmax {row['ppl_argmax']:.3f}, {row['kv_bytes_per_token']:.0f} B/token, {row['train_seconds']:.0f} s")
    rows = [json.loads(line) for line in runs_path.read_text().splitlines()] if runs_path.is_file() else []
    rows = [r for r in rows if r.get("config_key") == _config_key(cfg)]
    report = summarise(rows, arms)
    report.update({"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                   "threads": threads, "workers": workers, "torch": torch.__version__,
                   "config": dataclasses.asdict(cfg), "data": counts,
                   "wall_seconds_this_call": time.perf_counter() - t_start})
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(render_markdown(report))
    plot(report, out_dir / "ppl_vs_kv.png")
    return report


def lr_multipliers(model, cfg, arm: StudyArm) -> dict[str, float]:
    """The arm's lr multipliers: learned key scales at ``cfg.key_scale_lr_multiplier`` (they move ~lr per
    step), and the arm's own."""
    learned = any(name.endswith("key_log_scale") for name, _ in model.named_parameters())
    return {**({"key_log_scale": cfg.key_scale_lr_multiplier} if learned else {}), **dict(arm.lr_multipliers)}


def _config_key(cfg: StudyConfig) -> str:
    return settings_key(dataclasses.asdict(cfg))


def summarise(rows: list[dict], arms: tuple[StudyArm, ...]) -> dict:
    """Per arm: mean +- std over seeds of every figure; for mixSGA arms the paired (same seed) difference to
    the static baseline of the budget, its standard error, and the share of the base-to-baseline gap the
    arm recovers."""
    by_arm: dict[str, list[dict]] = {}
    for r in rows:
        by_arm.setdefault(r["arm"], []).append(r)
    base_ppl = None
    if "base (100%)" in by_arm:
        base_ppl = statistics.fmean(r["ppl_expert_choice"] for r in by_arm["base (100%)"])
    summary = []
    for arm in arms:
        runs = sorted(by_arm.get(arm.name, []), key=lambda r: r["seed"])
        if not runs:
            continue
        s = {"arm": arm.name, "method": arm.method, "family": arm.family, "budget": arm.budget, "seeds": len(runs)}
        for key in ("ppl_expert_choice", "ppl_argmax", "kv_bytes_per_token", "agreement", "decode_budget",
                    "conversion_ppl"):
            vals = [r[key] for r in runs if r.get(key) is not None]
            if vals:
                s[key], s[key + "_std"] = mean_std(vals)
        if runs[0].get("decode_ratios") is not None:
            s["decode_ratios"] = [statistics.fmean(r["decode_ratios"][e] for r in runs)
                                  for e in range(len(runs[0]["decode_ratios"]))]
        baseline = BASELINES.get(arm.budget)
        if arm.method == "mixsga" and baseline in by_arm:
            ref = {r["seed"]: r for r in by_arm[baseline]}
            for key, ref_key in (("ppl_expert_choice", "ppl_expert_choice"), ("ppl_argmax", "ppl_expert_choice"),
                                 ("conversion_ppl", "conversion_ppl")):
                diffs = [r[key] - ref[r["seed"]][ref_key] for r in runs
                         if r["seed"] in ref and r.get(key) is not None and ref[r["seed"]].get(ref_key) is not None]
                if diffs:
                    m, sd = mean_std(diffs)
                    s[f"diff_{key}"] = m
                    s[f"diff_{key}_se"] = sd / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
            s["baseline"] = baseline
            if base_ppl is not None:
                static = statistics.fmean(r["ppl_expert_choice"] for r in by_arm[baseline])
                gap = static - base_ppl
                s["gap_recovered"] = (static - s["ppl_expert_choice"]) / gap if gap > 0 else float("nan")
        summary.append(s)
    return {"arms": summary}


def _pm(s: dict, key: str, fmt: str = ".2f") -> str:
    if key not in s:
        return "-"
    return f"{s[key]:{fmt}} ± {s[key + '_std']:{fmt}}" if s.get("seeds", 1) > 1 else f"{s[key]:{fmt}}"


def render_markdown(report: dict) -> str:
    c = report["config"]
    d = report["data"]
    lines = [
        "# mixSGA quality study", "",
        f"{report['date']}, {report['machine']}, {report['threads']} torch threads, torch {report['torch']}.",
        f"Model: Llama, hidden {c['hidden']}, {c['layers']} layers, {c['heads']} query / {c['kv_heads']} KV heads, "
        f"vocab {c['vocab']}; base {c['base_steps']} steps from scratch; every arm continued {c['arm_steps']} steps "
        f"of {c['batch']}x{c['block']} tokens ({c['arm_steps'] * c['batch'] * c['block']:,} tokens) at lr {c['arm_lr']}, "
        f"seeds {c['seeds']}.",
        f"Data: {', '.join(d['sources'])}, {d['documents_train']} train / {d['documents_held_out']} held-out documents, "
        f"{d['tokens_train']:,} / {d['tokens_held_out']:,} tokens; {c['eval_blocks']} held-out blocks evaluated.", "",
        "| arm | KV budget | seeds | held-out ppl (expert choice) | ppl (causal argmax) | vs static (paired, ± SE) "
        "| gap recovered | at conversion | vs static at conversion | decode ratios | decode budget | KV bytes/token "
        "| argmax/EC agreement |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["arms"]:
        diff = "-"
        if "diff_ppl_expert_choice" in s:
            diff = f"{s['diff_ppl_expert_choice']:+.2f} ± {s['diff_ppl_expert_choice_se']:.2f}"
        conv = "-"
        if "diff_conversion_ppl" in s:
            conv = f"{s['diff_conversion_ppl']:+.1f} ± {s['diff_conversion_ppl_se']:.1f}"
        gap = f"{100 * s['gap_recovered']:.0f} %" if "gap_recovered" in s else "-"
        ratios = ":".join(f"{x:.2f}" for x in s["decode_ratios"]) if "decode_ratios" in s else "-"
        lines.append(
            f"| {s['arm']} | {s['budget']:.0%} | {s['seeds']} | {_pm(s, 'ppl_expert_choice')} | {_pm(s, 'ppl_argmax')} "
            f"| {diff} | {gap} | {_pm(s, 'conversion_ppl', '.1f')} | {conv} | {ratios} | {_pm(s, 'decode_budget', '.3f')} "
            f"| {_pm(s, 'kv_bytes_per_token', '.0f')} | {_pm(s, 'agreement', '.3f')} |")
    lines += ["", "'vs static': the mean over seeds of (arm - static GQA of the same budget), each seed against the "
              "baseline run with the same data order, ± its standard error. 'gap recovered': the share of the "
              "base-to-static-GQA perplexity gap the arm closes (100 % = as good as full KV; negative = worse than "
              "static GQA). Decode ratios / budget: what causal argmax routing realises on held-out text, and the "
              "KV bytes per token a compact fp32 cache stores for it (1 index byte per token and layer included)."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Held-out perplexity against KV budget with error bars (standard deviation over seeds)."""
    plt, fig, ax = budget_axes((6.6, 4.4))
    arms = report["arms"]
    for family, style, label in (("paper", "o--", "mixSGA as in the paper"),
                                 ("extended", "s-", "mixSGA + extensions (E1-E3)"),
                                 ("extended, mild mix", "D-.", "mixSGA + E1-E3, mild mix 1:7:2"),
                                 ("E1 only", "v", "mixSGA + E1 only")):
        pts = sorted((s for s in arms if s["family"] == family), key=lambda s: s["budget"])
        if pts:
            ax.errorbar([100 * s["budget"] for s in pts], [s["ppl_expert_choice"] for s in pts],
                        yerr=[s.get("ppl_expert_choice_std", 0.0) for s in pts], fmt=style, capsize=4, label=label)
    gqa = sorted((s for s in arms if s["method"] == "gqa"), key=lambda s: s["budget"])
    if gqa:
        ax.errorbar([100 * s["budget"] for s in gqa], [s["ppl_expert_choice"] for s in gqa],
                    yerr=[s.get("ppl_expert_choice_std", 0.0) for s in gqa], fmt="^:", capsize=4, markersize=8,
                    label="static GQA (mean-pooled)")
    for s in arms:
        if s["method"] == "base":
            ax.plot(100 * s["budget"], s["ppl_expert_choice"], "*", markersize=12, label="base (full KV)")
    save_budget_plot(plt, fig, ax, path, "held-out perplexity (mean ± std over seeds)",
                     "mixSGA vs static GQA at equal KV budget")


def check(out_dir: Path) -> None:
    """Every output exists, every mean is finite (the CI check of --quick)."""
    report = load_checked_report(out_dir, ("report.md", "report.json", "ppl_vs_kv.png", "runs.jsonl"))
    check_positive_finite(report["arms"], ("ppl_expert_choice", "ppl_argmax", "kv_bytes_per_token"))
