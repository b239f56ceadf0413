"""The uptraining-budget study's summary: paired differences to static GQA per budget, the verdict per KV
budget, the markdown report and the plots (regime.py runs the study)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from .reports import budget_axes, mean_std
from .study import BASELINES

#: A difference is called a lead when it is beyond this many standard errors.
SIGNIFICANT_SE = 2.0


def _mean_se(values: list[float]) -> tuple[float, float]:
    m, sd = mean_std(values)
    return m, (sd / math.sqrt(len(values)) if len(values) > 1 else float("nan"))


def _paired(runs: list[dict], ref: dict[int, dict], key: str) -> dict:
    """Mean ± SE over seeds of (run[key] - baseline's expert-choice ppl), absolute and in % of the baseline."""
    pairs = [(r[key], ref[r["seed"]]["ppl_expert_choice"]) for r in runs if r["seed"] in ref]
    if not pairs:
        return {}
    d, d_se = _mean_se([a - b for a, b in pairs])
    rel, rel_se = _mean_se([100.0 * (a - b) / b for a, b in pairs])
    return {"diff": d, "diff_se": d_se, "rel": rel, "rel_se": rel_se, "pairs": len(pairs)}


def classify(rel: float, rel_se: float) -> str:
    """"mixSGA" when it is ahead by more than 2 SE, "static GQA" when behind by more than 2 SE, else "tie"."""
    if math.isnan(rel_se):
        return "one seed"
    if rel + SIGNIFICANT_SE * rel_se < 0:
        return "mixSGA"
    if rel - SIGNIFICANT_SE * rel_se > 0:
        return "static GQA"
    return "tie"


def summarise(rows: list[dict], trajectory: list[dict], arms, cfg) -> dict:
    budgets = (0.0,) + tuple(cfg.budgets)
    cells = []
    by = {}
    for r in rows:
        by.setdefault((r["arm"], r["budget"]), []).append(r)
    for arm in arms:
        for b in budgets:
            runs = sorted(by.get((arm.name, b), []), key=lambda r: r["seed"])
            if not runs:
                continue
            cell = {"arm": arm.name, "method": arm.method, "family": arm.family, "kv_budget": arm.budget,
                    "budget": b, "seeds": [r["seed"] for r in runs], "tokens": runs[0]["tokens"],
                    "steps": runs[0]["steps"]}
            for key in ("ppl_expert_choice", "ppl_argmax", "decode_budget", "agreement", "kv_bytes_per_token"):
                vals = [r[key] for r in runs if r.get(key) is not None]
                if vals:
                    cell[key], cell[key + "_std"] = mean_std(vals)
            if arm.method == "mixsga":
                ref = {r["seed"]: r for r in by.get((BASELINES[arm.budget], b), [])}
                for key, name in (("ppl_expert_choice", "vs_static"), ("ppl_argmax", "vs_static_argmax")):
                    paired = _paired(runs, ref, key)
                    if paired:
                        cell[name] = {**paired, "verdict": classify(paired["rel"], paired["rel_se"])}
            cells.append(cell)
    verdicts = {}
    for kv in sorted({a.budget for a in arms if a.method == "mixsga"}, reverse=True):
        per_budget = []
        for b in budgets:
            cands = [c for c in cells if c["kv_budget"] == kv and c["budget"] == b and "vs_static" in c]
            if cands:
                best = min(cands, key=lambda c: c["vs_static"]["rel"])
                per_budget.append({"budget": b, "best_arm": best["arm"], **best["vs_static"]})
        verdicts[str(kv)] = per_budget
    return {"cells": cells, "verdicts": verdicts, "trajectory": _trajectory(trajectory, arms)}


def _trajectory(points: list[dict], arms) -> list[dict]:
    """Per (arm, budget, step) along the way: mean ppl over seeds and the paired difference to static GQA."""
    by = {}
    for p in points:
        by.setdefault((p["arm"], p["budget"], p["step"]), []).append(p)
    out = []
    for arm in arms:
        for (name, b, step), pts in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2])):
            if name != arm.name:
                continue
            row = {"arm": name, "kv_budget": arm.budget, "budget": b, "step": step, "tokens": pts[0]["tokens"],
                   "seeds": len(pts), "ppl_expert_choice": statistics.fmean(p["ppl_expert_choice"] for p in pts)}
            for key in ("decode_budget", "agreement"):
                vals = [p[key] for p in pts if p.get(key) is not None]
                if vals:
                    row[key] = statistics.fmean(vals)
            scales = [s for p in pts for layer in (p.get("key_scales") or []) if layer for s in layer]
            if scales:
                row["key_scale_mean"] = statistics.fmean(scales)
            if arm.method == "mixsga":
                ref = {p["seed"]: p for p in by.get((BASELINES[arm.budget], b, step), [])}
                paired = _paired(pts, ref, "ppl_expert_choice")
                if paired:
                    row["vs_static"] = paired
            out.append(row)
    return out


def _pct(b: float) -> str:
    return "0 (conversion)" if b == 0 else f"{100 * b:g} %"


def render_markdown(r: dict) -> str:
    c = r["config"]
    budgets = [0.0] + list(c["budgets"])
    cells = {(x["arm"], x["budget"]): x for x in r["cells"]}
    arms = list(dict.fromkeys(x["arm"] for x in r["cells"]))
    curve = r["base_curve"]
    steps_of = {x["budget"]: (x["steps"], x["tokens"]) for x in r["cells"]}
    lines = [
        "# mixSGA against static GQA by uptraining budget", "",
        f"{r['date']}, {r['machine']}, {r['workers']} worker(s) x {r['threads']} torch thread(s), torch {r['torch']}; "
        f"{r['run_seconds_total'] / 60:.0f} min of runs (this call: {r['wall_seconds_this_call'] / 60:.0f} min wall).", "",
        f"Base: Llama hidden {c['hidden']}, {c['layers']} layers, {c['heads']} query / {c['kv_heads']} KV heads, vocab "
        f"{c['vocab']}; trained from scratch for {r['base_steps']} steps of {c['base_batch']}x{c['block']} tokens "
        f"({r['base_tokens']:,} tokens, {c['base_epochs']:g} epoch(s) of the train split) at peak lr {c['base_lr']}"
        + (f"; held-out ppl {curve[-1]['ppl']:.2f}" if curve else "") + ".",
        f"Uptraining: batch {c['batch']}x{c['block']}, peak lr {r['uptrain_lr']:g} ({c['lr_ratio']:g} x the base's), "
        "warm-up 1.5 %, cosine; each budget a separate run: "
        + ", ".join(f"{_pct(b)} = {steps_of[b][0]} steps / {steps_of[b][1]:,} tokens" for b in c["budgets"] if b in steps_of)
        + f". Seeds {tuple(c['seeds'])}; {c['eval_blocks']} held-out blocks.", "",
        "## Held-out perplexity, expert-choice prefill (mean ± std over seeds)", "",
        "| arm | " + " | ".join(_pct(b) for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|",
    ]
    for a in arms:
        vals = []
        for b in budgets:
            x = cells.get((a, b))
            vals.append("-" if x is None else f"{x['ppl_expert_choice']:.2f} ± {x['ppl_expert_choice_std']:.2f}")
        lines.append(f"| {a} | " + " | ".join(vals) + " |")
    for key, title in (("vs_static", "expert-choice prefill"), ("vs_static_argmax", "causal argmax routing (as decoding routes)")):
        lines += ["", f"## Paired difference to static GQA of the same KV budget, {title}", "",
                  "mean over seeds of (arm - GQA) / GQA in %, ± SE; **bold** where beyond 2 SE.", "",
                  "| arm | " + " | ".join(_pct(b) for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
        for a in arms:
            if not any(key in cells.get((a, b), {}) for b in budgets):
                continue
            vals = []
            for b in budgets:
                d = cells.get((a, b), {}).get(key)
                if d is None:
                    vals.append("-")
                else:
                    text = f"{d['rel']:+.1f} ± {d['rel_se']:.1f} % ({d['diff']:+.2f})"
                    vals.append(f"**{text}**" if d["verdict"] in ("mixSGA", "static GQA") else text)
            lines.append(f"| {a} | " + " | ".join(vals) + " |")
    lines += ["", "## Verdict per KV budget (best mixSGA arm at each uptraining budget, expert choice)", ""]
    for kv, per in r["verdicts"].items():
        parts = [f"{_pct(v['budget'])}: {v['verdict']} ({v['rel']:+.1f} ± {v['rel_se']:.1f} %, {v['best_arm']})" for v in per]
        lines.append(f"- KV {float(kv):.0%}: " + "; ".join(parts))
    watch = [t for t in r["trajectory"] if t["budget"] == c["watch_budget"]]
    if watch:
        lines += ["", f"## The first steps: the {_pct(c['watch_budget'])} runs along the way", "",
                  "| arm | step | tokens | ppl (EC) | vs static % (± SE) | decode budget | argmax/EC agreement | mean key scale |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in watch:
            vs = t.get("vs_static")
            vs_text = f"{vs['rel']:+.1f} ± {vs['rel_se']:.1f}" if vs else "-"
            lines.append(f"| {t['arm']} | {t['step']} | {t['tokens']:,} | {t['ppl_expert_choice']:.2f} | {vs_text} | "
                         f"{t.get('decode_budget', float('nan')):.3f} | {t.get('agreement', float('nan')):.3f} | "
                         f"{t.get('key_scale_mean', float('nan')):.3f} |")
    if curve:
        lines += ["", "## The base's held-out curve", "", "| step | tokens | held-out ppl |", "|---|---|---|"]
        lines += [f"| {p['step']} | {p['tokens']:,} | {p['ppl']:.2f} |" for p in curve]
    return "\n".join(lines).replace("nan", "-") + "\n"


def plot_crossover(r: dict, path: Path) -> None:
    """Per KV budget: held-out ppl (top) and the paired difference to static GQA in % ± SE (bottom) against
    uptraining tokens on a log axis, labelled in % of the base's pretraining."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = r["config"]
    kvs = sorted({x["kv_budget"] for x in r["cells"] if x["method"] == "mixsga"}, reverse=True)
    fig, axes = plt.subplots(2, len(kvs), figsize=(5.6 * len(kvs), 7.6), squeeze=False, sharex=True)
    first = min(x["tokens"] for x in r["cells"] if x["budget"] > 0)
    conv_x = first / 4  # the conversion point, left of the smallest budget on the log axis
    xs = lambda cells: [x["tokens"] if x["budget"] > 0 else conv_x for x in cells]  # noqa: E731
    ticks = sorted({x["tokens"] for x in r["cells"] if x["budget"] > 0})
    labels = {x["tokens"]: f"{100 * x['budget']:g} %" for x in r["cells"] if x["budget"] > 0}
    for col, kv in enumerate(kvs):
        top, bottom = axes[0][col], axes[1][col]
        names = list(dict.fromkeys(x["arm"] for x in r["cells"] if x["kv_budget"] == kv and x["family"] != "push"))
        for name in names:
            cells = sorted((x for x in r["cells"] if x["arm"] == name), key=lambda x: x["budget"])
            style = "k^:" if cells[0]["method"] == "gqa" else "o-"
            top.errorbar(xs(cells), [x["ppl_expert_choice"] for x in cells],
                         yerr=[x["ppl_expert_choice_std"] for x in cells], fmt=style, capsize=3, label=name)
            diff = [x for x in cells if "vs_static" in x]
            if diff:
                bottom.errorbar(xs(diff), [x["vs_static"]["rel"] for x in diff],
                                yerr=[0.0 if math.isnan(x["vs_static"]["rel_se"]) else x["vs_static"]["rel_se"] for x in diff],
                                fmt="o-", capsize=3, label=name)
        if r["base_curve"]:
            top.axhline(r["base_curve"][-1]["ppl"], color="gray", ls="--", lw=1, label="base (full KV)")
        top.set_yscale("log")
        top.set_ylabel("held-out ppl (expert choice), mean ± std")
        top.set_title(f"KV budget {kv:.0%}")
        bottom.axhline(0.0, color="k", lw=1)
        bottom.set_yscale("symlog", linthresh=5.0)
        lo, hi = bottom.get_ylim()
        ticks_y = [t for t in (-40, -20, -10, -5, -2, 0, 2, 5, 10, 20, 40, 80) if lo <= t <= hi]
        bottom.set_yticks(ticks_y)
        bottom.set_yticklabels([f"{t:+d}" if t else "0" for t in ticks_y])
        bottom.set_ylabel("vs static GQA, % (paired, ± SE); < 0: mixSGA better")
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        bottom.set_xticks([conv_x] + ticks)
        bottom.set_xticklabels(["conv."] + [f"{labels[t]}\n{t / 1e3:,.0f}k" for t in ticks], fontsize=8)
        bottom.set_xlabel(f"uptraining tokens (% of the base's {r['base_tokens'] / 1e6:.1f} M pretraining tokens)")
    fig.suptitle(f"mixSGA vs static GQA by uptraining budget ({len(c['seeds'])} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_base_curve(r: dict, path: Path) -> None:
    plt, fig, ax = budget_axes((5.6, 3.6))
    pts = [p for p in r["base_curve"] if p["step"] > 0]
    ax.plot([p["tokens"] / 1e6 for p in pts], [p["ppl"] for p in pts], "o-", markersize=3)
    ax.set_yscale("log")
    ax.set_xlabel("pretraining tokens (M)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("the base model's held-out curve")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
