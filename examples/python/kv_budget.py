"""KV memory you can set, measured on SmolLM2-135M (offline GGUF) and the study's Debian documents: the KV budget
that decoding realises on held-out text with plain argmax routing and with calibrated decode offsets, and one
converted model served at several budgets chosen at inference (``mixsga.hf.set_kv_budget``).

SmolLM2 has 3 KV heads, so group sizes (1, 3): budgets from 1/3 to 1. The model is converted with the
recommended extensions and prepared (calibrated key scales, routers warm-started), not uptrained: the
perplexities are those at conversion (docs/STUDY.md says how far uptraining moves them), so the point here is
the budget, which calibration controls whatever the weights.

    PYTHONPATH=build/python .venv/bin/python examples/python/kv_budget.py --out out/kv_budget

Writes <out>/kv_budget.json and .md, and docs/img/kv_budget_smollm2.png (--plot).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mixsga import hf  # noqa: E402
from mixsga.models import load_gguf_llama, smollm2_gguf_path  # noqa: E402
from mixsga.train.evaluate import perplexity  # noqa: E402
from mixsga_demo.corpus import load_documents, split_documents  # noqa: E402

GROUPS, RATIOS = (1, 3), (0.25, 0.75)  # 50 % of the full KV cache


def stored_fraction(model, ids: torch.Tensor, prompt: int = 16) -> tuple[float, float]:
    """(stored, allocated) K/V bytes over the full cache's after a prefill of ``prompt`` tokens and teacher-forced
    decode steps over the rest of ``ids`` [B, T] through the compact cache."""
    cache = hf.MixSGACache(num_layers=model.config.num_hidden_layers)
    with torch.no_grad():
        model(ids[:, :prompt], past_key_values=cache, use_cache=True)
        for t in range(prompt, ids.shape[1]):
            model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
    full = cache.full_bytes_per_token()
    return cache.stored_bytes_per_token() / full, cache.allocated_bytes_per_token() / full


def capped_decode(model, blocks: torch.Tensor, kv_cap: float | None, reserve: bool, batch: int = 8) -> dict:
    """Held-out perplexity of decode routing (causal argmax, calibrated offsets) through the compact cache, with
    the hard cap ``kv_cap`` (None: offsets alone) and, with ``reserve``, pools reserved once for the block length.
    Also the stored and allocated K/V over the full cache's, and the largest share any sequence stored in any
    layer (what the cap bounds)."""
    nll, tokens, stored, allocated, full, worst = 0.0, 0, 0, 0, 0, 0.0
    groups = torch.tensor([1.0 / g for g in GROUPS], dtype=torch.float64)
    with torch.no_grad(), hf.causal_routing(model):
        for i in range(0, len(blocks), batch):
            ids = blocks[i : i + batch]
            cache = hf.MixSGACache(model.config, kv_cap=kv_cap, max_length=ids.shape[1] if reserve else None)
            logits = model(ids, past_key_values=cache, use_cache=True).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
            nll, tokens = nll + float(loss), tokens + ids[:, 1:].numel()
            stored, allocated = stored + cache.bytes_stored(), allocated + cache.bytes_allocated()
            full += cache.full_bytes_per_token() * cache.tokens_stored()
            for layer in range(len(cache.layers)):
                lengths = cache.hetero.lengths(layer).to(torch.float64)
                worst = max(worst, float(((lengths * groups).sum(1) / lengths.sum(1)).max()))
    return {"kv_cap": kv_cap, "reserved": reserve, "ppl": math.exp(nll / tokens), "stored": stored / full,
            "allocated": allocated / full, "max_sequence_share": worst}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/kv_budget")
    p.add_argument("--budgets", default="0.4,0.5,0.75", help="budgets served at inference")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--docs", type=int, default=32, help="documents per text set (one block from each)")
    p.add_argument("--caps", default="0.5,0.4", help="budgets at which the hard cap's cost is measured ('' none)")
    p.add_argument("--plot", default="docs/img/kv_budget_smollm2.png", help="'' for none")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    base, tokenizer = load_gguf_llama(smollm2_gguf_path())
    base.config.use_cache = False
    train_docs, held_docs = split_documents(load_documents(), held_out_fraction=0.05)

    def blocks(docs):
        """The first block of each of --docs documents (routing varies by document: many documents, one
        block each, estimate the corpus's shares)."""
        out = []
        for doc in docs:
            ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
            if len(ids) >= args.block:
                out.append(ids[: args.block])
            if len(out) == args.docs:
                break
        return torch.tensor(out)

    calib = blocks(train_docs[::20])  # calibration text: training documents
    held, held_b = blocks(held_docs[::2]), blocks(held_docs[1::2])  # two sets of held-out documents
    result = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)", "group_sizes": GROUPS,
              "trained_ratios": RATIOS, "calibration_tokens": calib.numel(), "held_out_tokens": held.numel(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    result["base_ppl"] = perplexity(base, held)
    print(f"[kv_budget] base ppl {result['base_ppl']:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    model = hf.convert(copy.deepcopy(base), group_sizes=GROUPS, ratios=RATIOS, **hf.RECOMMENDED)
    hf.prepare(model, calib)
    model.eval()
    result["uncalibrated"] = {"realised_budget": hf.realised_kv_budget(model, held),
                              "realised_budget_b": hf.realised_kv_budget(model, held_b)}
    result["uncalibrated"]["stored"], result["uncalibrated"]["allocated"] = stored_fraction(model, held[:2])
    print(f"[kv_budget] uncalibrated: realised {result['uncalibrated']['realised_budget']:.4f}", flush=True)
    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        calibrated = hf.set_kv_budget(model, calib, budget)
        row = {"budget": budget, "calibration_realised": calibrated,
               "held_out_realised": hf.realised_kv_budget(model, held),
               "held_out_b_realised": hf.realised_kv_budget(model, held_b)}
        row["stored"], row["allocated"] = stored_fraction(model, held[:2])
        with hf.causal_routing(model):
            row["ppl_causal_argmax"] = perplexity(model, held)
        row["ppl_expert_choice"] = perplexity(model, held)
        rows.append(row)
        print(f"[kv_budget] budget {budget:.2f}: held-out realised {row['held_out_realised']:.4f} / "
              f"{row['held_out_b_realised']:.4f}, stored "
              f"{row['stored']:.4f}, allocated {row['allocated']:.4f}, ppl causal {row['ppl_causal_argmax']:.1f} / "
              f"expert choice {row['ppl_expert_choice']:.1f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    result["served"] = rows
    caps = []
    for budget in [float(b) for b in args.caps.split(",") if b]:
        hf.set_kv_budget(model, calib, budget)  # calibrated offsets for this budget, then the cap on top
        for kv_cap, reserve in ((None, False), (budget, False), (budget, True)):
            row = {"budget": budget, **capped_decode(model, held, kv_cap, reserve)}
            caps.append(row)
            print(f"[kv_budget] budget {budget:.2f}, cap {kv_cap}, reserved {reserve}: ppl {row['ppl']:.2f}, stored "
                  f"{row['stored']:.4f}, allocated {row['allocated']:.4f}, largest sequence share "
                  f"{row['max_sequence_share']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    result["caps"] = caps
    result["seconds"] = time.perf_counter() - t0
    (out / "kv_budget.json").write_text(json.dumps(result, indent=2) + "\n")

    lines = ["| budget set | realised, calibration docs | realised, held-out docs A | realised, held-out docs B "
             "| stored (decode, A) | allocated (decode, A) | ppl causal argmax (A) | ppl expert choice (A) |",
             "|---|---|---|---|---|---|---|---|"]
    u = result["uncalibrated"]
    lines.append(f"| 0.50, plain argmax (uncalibrated) | - | {u['realised_budget']:.4f} | {u['realised_budget_b']:.4f} | "
                 f"{u['stored']:.4f} | {u['allocated']:.4f} | - | - |")
    for r in rows:
        lines.append(f"| {r['budget']:.2f} | {r['calibration_realised']:.4f} | {r['held_out_realised']:.4f} | "
                     f"{r['held_out_b_realised']:.4f} | {r['stored']:.4f} | {r['allocated']:.4f} | "
                     f"{r['ppl_causal_argmax']:.1f} | {r['ppl_expert_choice']:.1f} |")
    if caps:
        lines += ["", "| budget | routing | ppl (decode routing, A) | stored | allocated | largest sequence-layer share |",
                  "|---|---|---|---|---|---|"]
        for r in caps:
            how = ("calibrated offsets alone" if r["kv_cap"] is None else
                   f"+ cap {r['kv_cap']:.2f}" + (", pools reserved for the block" if r["reserved"] else ""))
            lines.append(f"| {r['budget']:.2f} | {how} | {r['ppl']:.2f} | {r['stored']:.4f} | {r['allocated']:.4f} | "
                         f"{r['max_sequence_share']:.4f} |")
    (out / "kv_budget.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["held_out_realised"] for r in rows], [r["ppl_causal_argmax"] for r in rows], "o-",
                label="one converted model, budget set at inference (causal argmax)")
        for r in rows:
            ax.annotate(f"set {r['budget']:.2f}", (r["held_out_realised"], r["ppl_causal_argmax"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
        ax.axhline(result["base_ppl"], color="gray", ls="--", label=f"base, full cache ({result['base_ppl']:.1f})")
        ax.set_xlabel("realised KV budget on held-out text (fraction of the full cache)")
        ax.set_ylabel("held-out perplexity (log)")
        ax.set_yscale("log")
        ax.set_title("SmolLM2-135M converted to mixSGA (1, 3), not uptrained")
        ax.legend(fontsize=8)
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
    print(f"[kv_budget] done in {time.perf_counter() - t0:.0f} s; {out / 'kv_budget.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
