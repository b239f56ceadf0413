"""The report of the equal-KV-bytes comparison (kv_alternatives.py): per model and target, each method's paired
difference in continuation NLL to the full model and to the best method of the other kind (± SE over sequences,
and over seeds for trained arms), the table, the plot, and the checks a finished run must pass."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

SMOLLM2 = "SmolLM2-135M"
TESTBED = "test-bed"
FAMILIES = ("full", "quantized KV", "kvpress", "GQA at conversion", "GQA uptrained", "mixSGA at conversion",
            "mixSGA uptrained")


def _se(values: list[float]) -> float | None:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float | None]:
    """(mean of a_i - b_i, its standard error stdev / sqrt(n)) over paired values."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired values: lengths {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    return statistics.fmean(d), _se(d)


#: "No more bytes than": a realised KV fraction up to 1 % above the row's own still counts (index bytes, rounding).
BYTES_TOLERANCE = 0.01


def _compare(s: dict, candidates: list[dict], tag: str) -> None:
    """The paired NLL difference of summary ``s`` to the lowest-NLL candidate (± SE over sequences, and over
    seeds when ``s`` has several: each seed against the candidate's run of that seed, else its mean)."""
    if not candidates:
        return
    best = min(candidates, key=lambda o: o["nll"])
    s[f"{tag}_other"] = best["method"]
    s[f"d_{tag}"], s[f"d_{tag}_se"] = paired_difference(s["per_sequence_nll"], best["per_sequence_nll"])
    if s["n_seeds"] > 1:
        ref_by_seed = {r.get("seed"): r["nll"] for r in best["runs"]}
        s[f"d_{tag}_se_seeds"] = _se([r["nll"] - ref_by_seed.get(r.get("seed"), best["nll"]) for r in s["runs"]])


def summarise(rows: list[dict]) -> list[dict]:
    """Per (model, method, target): the rows of every seed, their per-sequence values averaged over seeds,
    means, and paired differences (NLL) ± SE over sequences (and, with several seeds, over seeds) to the full
    model (``d_full``), to the best method of the other kind at the same target (mixSGA against the best
    non-mixSGA method, and the other way round: ``d_best``, ``best_other``), and to the best method of the
    other kind that stores no more KV bytes, whatever its target (``d_le``, ``le_other``)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("nll") is None:
            continue
        groups.setdefault((r["model"], r["method"], round(float(r["target"]), 6)), []).append(r)
    summary = []
    for (model, method, target), runs in groups.items():
        runs = sorted(runs, key=lambda r: (r.get("seed") is None, r.get("seed") or 0))
        per_seq = [statistics.fmean(vals) for vals in zip(*(r["per_sequence_nll"] for r in runs))]
        s = {"model": model, "method": method, "target": target, "family": runs[0].get("family", ""),
             "seeds": [r.get("seed") for r in runs], "n_seeds": len(runs), "runs": runs,
             "per_sequence_nll": per_seq, "nll": statistics.fmean(per_seq),
             "kv_fraction": statistics.fmean(r["kv_fraction"] for r in runs),
             "top1_agreement": statistics.fmean(r["top1_agreement"] for r in runs),
             "greedy_agreement": statistics.fmean(r["greedy_agreement"] for r in runs),
             "note": runs[0].get("note", "")}
        s["ppl"] = math.exp(s["nll"])
        summary.append(s)
    by_model: dict[str, list[dict]] = {}
    for s in summary:
        by_model.setdefault(s["model"], []).append(s)
    for model, items in by_model.items():
        full = next((s for s in items if s["method"] == "full"), None)
        for s in items:
            if full is not None and s is not full and len(full["per_sequence_nll"]) == len(s["per_sequence_nll"]):
                s["d_full"], s["d_full_se"] = paired_difference(s["per_sequence_nll"], full["per_sequence_nll"])
                if s["n_seeds"] > 1:
                    s["d_full_se_seeds"] = _se([r["nll"] - full["nll"] for r in s["runs"]])
            if s["method"] == "full":
                continue
            mine = s["family"].startswith("mixSGA")
            others = [o for o in items if o["target"] == s["target"] and o["method"] != "full"
                      and o["family"].startswith("mixSGA") != mine
                      and len(o["per_sequence_nll"]) == len(s["per_sequence_nll"])]
            _compare(s, others, "best")
            # The same, among the other kind's methods (any target) that store no more bytes than this one.
            cheaper = [o for o in items if o["method"] != "full" and o["family"].startswith("mixSGA") != mine
                       and o["kv_fraction"] <= s["kv_fraction"] * (1 + BYTES_TOLERANCE)
                       and len(o["per_sequence_nll"]) == len(s["per_sequence_nll"])]
            _compare(s, cheaper, "le")
    order = {f: i for i, f in enumerate(FAMILIES)}
    summary.sort(key=lambda s: (s["model"] != SMOLLM2, -s["target"], order.get(s["family"], 99), s["nll"]))
    return summary


def _fmt_d(s: dict, key: str) -> str:
    if key not in s:
        return "-"
    text = f"{s[key]:+.4f}"
    if s.get(key + "_se") is not None:
        text += f" ± {s[key + '_se']:.4f}"
    if s.get(key + "_se_seeds") is not None:
        text += f" (seeds ± {s[key + '_se_seeds']:.4f})"
    return text


def render_markdown(rows: list[dict]) -> str:
    """One table per model: method, target, realised KV fraction, ppl, paired ΔNLL to the full model and to
    the best method of the other kind (mixSGA vs not) at the same target, ± SE over sequences (and over
    seeds), top-1 and greedy agreement with the full model."""
    summary = summarise(rows)
    lines = ["# At equal KV bytes: mixSGA and what users would pick instead", ""]
    models = sorted({s["model"] for s in summary}, key=lambda m: m != SMOLLM2)
    for model in models:
        items = [s for s in summary if s["model"] == model]
        n = len(items[0]["per_sequence_nll"])
        lines += [f"## {model}", "", f"{n} held-out sequences.", "",
                  "| method | family | target | seeds | KV fraction | ppl | ΔNLL vs full (± SE) "
                  "| ΔNLL vs best other, same target (± SE) | best other, same target "
                  "| ΔNLL vs best other with ≤ its KV bytes (± SE) | best other with ≤ its KV bytes | top-1 | greedy |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in items:
            lines.append(
                f"| {s['method']} | {s['family']} | {s['target']:.2f} | {s['n_seeds']} | {s['kv_fraction']:.4f} "
                f"| {s['ppl']:.3f} | {_fmt_d(s, 'd_full')} | {_fmt_d(s, 'd_best')} | {s.get('best_other', '-')} "
                f"| {_fmt_d(s, 'd_le')} | {s.get('le_other', '-')} "
                f"| {s['top1_agreement']:.3f} | {s['greedy_agreement']:.3f} |")
        lines.append("")
    failed = [r for r in rows if r.get("nll") is None]
    if failed:
        lines += ["## Not run or failed", ""]
        seen = set()
        for r in failed:
            text = f"- {r['model']}, {r.get('method')}, target {r.get('target')}: {r.get('error') or r.get('note')}"
            if text not in seen:
                seen.add(text)
                lines.append(text)
        lines.append("")
    lines += [
        "ΔNLL: mean over sequences of the paired difference in mean continuation NLL (nats per token), per-sequence "
        "values averaged over seeds first; ± the standard error over sequences, and for trained arms over seeds "
        "(the per-seed differences); negative = this row is better. 'best other, same target': the lowest-NLL method of "
        "the other kind (mixSGA vs not mixSGA, the full model excluded) at the same target, whatever bytes it "
        "realises; 'best other with ≤ its KV bytes': the same among the other kind's methods of any target whose "
        f"realised KV fraction is at most this row's (+{100 * BYTES_TOLERANCE:g} %). KV fraction: bytes of the context's cache over a bf16 full cache of "
        "the same tokens (quantized: payload + bf16 scale and zero point per group; mixSGA: the compact cache's "
        "stored bytes with its expert index; presses: kept elements). Top-1: share of continuation positions whose "
        "teacher-forced argmax equals the full model's; greedy: position-wise agreement of greedy generations.", ""]
    return "\n".join(lines)


_MARKERS = {"full": "*", "quantized KV": "s", "kvpress": "^", "GQA at conversion": "v", "GQA uptrained": "D",
            "mixSGA at conversion": "o", "mixSGA uptrained": "P"}


def plot(rows: list[dict], path: Path) -> None:
    """ppl against realised KV fraction, one marker per method family, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(rows)
    models = sorted({s["model"] for s in summary}, key=lambda m: m != SMOLLM2) or [SMOLLM2]
    fig, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models), 4.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        items = [s for s in summary if s["model"] == model]
        for family in FAMILIES:
            pts = [s for s in items if s["family"] == family]
            if not pts:
                continue
            if family == "full":
                ax.axhline(pts[0]["ppl"], color="gray", ls="--", lw=1)
            ax.plot([s["kv_fraction"] for s in pts], [s["ppl"] for s in pts], _MARKERS.get(family, "x"),
                    label=family, markersize=9 if family == "full" else 6, alpha=0.85)
        ax.set_xscale("log", base=2)
        ticks = [0.125, 0.25, 0.5, 1.0]
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{100 * t:g} %" for t in ticks])
        ax.set_yscale("log")
        ax.set_xlabel("realised KV fraction (bytes / bf16 full cache)")
        ax.set_ylabel("continuation perplexity")
        ax.set_title(model)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("At equal KV bytes: held-out continuation perplexity")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check(rows: list[dict], kvpress: bool) -> list[str]:
    """What is wrong with a finished run's rows (empty: nothing): every model has its full-model reference
    (agreeing with itself), no method failed, every figure is finite and in range, a capped mixSGA cache kept
    every sequence within its cap, and, when ``kvpress`` is expected, every model has kvpress rows."""
    problems = []
    models = sorted({r["model"] for r in rows})
    if not models:
        return ["no rows"]
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        full = [r for r in mine if r["method"] == "full" and r.get("nll") is not None]
        if not full or full[0]["top1_agreement"] != 1.0 or full[0]["greedy_agreement"] != 1.0:
            problems.append(f"{model}: no full-model reference agreeing with itself")
        if kvpress and not any(r["method"].startswith("kvpress:") and r.get("nll") is not None for r in mine):
            problems.append(f"{model}: no kvpress rows")
        for r in mine:
            name = f"{model} / {r['method']} (target {r.get('target')}, seed {r.get('seed')})"
            if r.get("error"):
                problems.append(f"{name}: {r['error']}")
            if r.get("nll") is None:
                continue
            if not (math.isfinite(r["nll"]) and math.isfinite(r["ppl"]) and 0.0 < r["kv_fraction"] <= 1.05
                    and 0.0 <= r["top1_agreement"] <= 1.0 and 0.0 <= r["greedy_agreement"] <= 1.0):
                problems.append(f"{name}: a figure is not finite or out of range")
            cap = (r.get("details") or {}).get("kv_cap")
            if cap is not None and r["details"]["largest_sequence_share_end"] > cap + 1e-9:
                problems.append(f"{name}: a sequence stored {r['details']['largest_sequence_share_end']:.4f} > cap {cap}")
    return problems
