"""SmolLM2-135M at conversion (no training): held-out perplexity of the budget-matched static baseline and
of mixSGA 1:3 as in the paper and with each quality extension, on the study's held-out documents.

SmolLM2 has 3 KV heads, so group sizes (1, 3): mixSGA 1:3 keeps 50 % of the KV cache; the static
baseline at that budget is layer-mixed GQA (every 4th layer keeps 3 heads, the others pool to 1: 51 %).
The paper's router is random at conversion, so its arms run once per seed; the extensions' routing
(pooling error, warm start) and calibration are deterministic given the data.

`python examples/python/study.py --smollm2-conversion` writes <out>/smollm2_conversion.{md,json}.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

import torch

from mixsga import hf
from mixsga.train.evaluate import perplexity

from .corpus import load_documents, split_documents
from .demo import _pool_layers

ARMS = (
    ("base (100%)", None),
    ("GQA layer-mixed (51%)", "layer_mixed"),
    ("mixSGA 1:3 paper (50%)", {}),
    ("mixSGA 1:3 + E1 calibrated key scale", {"key_scale": "learned"}),
    ("mixSGA 1:3 + E2 pooling-error routing", {"routing_signal": "pooling_error"}),
    ("mixSGA 1:3 + E1 + E2 (+E3 warm start)", dict(hf.RECOMMENDED)),
)


def run(out_dir: Path, seeds=(0, 1, 2), eval_blocks: int = 16, block: int = 128, threads: int = 2) -> dict:
    from mixsga.models import load_gguf_llama, smollm2_gguf_path

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    base, tokenizer = load_gguf_llama(smollm2_gguf_path())
    base.config.use_cache = False
    train_docs, held_docs = split_documents(load_documents(), held_out_fraction=0.05)

    def blocks(docs, n):
        ids = tokenizer("\n\n".join(d.text for d in docs[: 4 * n]), add_special_tokens=False)["input_ids"]
        ids = torch.tensor(ids[: n * block]).view(n, block)
        return ids

    held = blocks(held_docs, eval_blocks)
    calib = blocks(train_docs[::50], 8)
    rows = []
    for name, arm in ARMS:
        vals, info = [], {}
        for seed in (seeds if isinstance(arm, dict) else seeds[:1]):
            model = copy.deepcopy(base)
            if arm == "layer_mixed":
                _pool_layers(model, kv_heads=1, keep_every=4)
            elif isinstance(arm, dict):
                torch.manual_seed(1000 + seed)
                hf.convert(model, group_sizes=(1, 3), ratios=(0.25, 0.75), **arm)
                if arm.get("key_scale") == "learned" or arm.get("routing_signal") == "pooling_error":
                    report = hf.prepare(model, calib, router_steps=200 if arm.get("routing_signal") else 0)
                    info["key_scales_layer0"] = report["key_scales"][0]
            vals.append(perplexity(model, held, batch_size=4))
            print(f"[smollm2] {name}, seed {seed}: {vals[-1]:.1f}", flush=True)
            if isinstance(arm, dict) and arm.get("routing_signal") == "pooling_error" and seed == seeds[0]:
                break  # deterministic routing: one run (the router only matters for argmax decode)
        rows.append({"arm": name, "ppl": statistics.fmean(vals), "ppl_std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                     "runs": len(vals), **info})
    report = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "eval_blocks": eval_blocks,
              "block": block, "seconds": time.perf_counter() - t0, "arms": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "smollm2_conversion.json").write_text(json.dumps(report, indent=2))
    lines = ["# SmolLM2-135M at conversion (no training)", "",
             f"{report['date']}, torch {report['torch']}, {eval_blocks} held-out blocks of {block} tokens "
             "(linux-doc + python-doc held-out documents, SmolLM2's tokenizer).", "",
             "| arm | held-out ppl | runs |", "|---|---|---|"]
    for r in rows:
        pm = f" ± {r['ppl_std']:.1f}" if r["runs"] > 1 else ""
        lines.append(f"| {r['arm']} | {r['ppl']:.1f}{pm} | {r['runs']} |")
    (out_dir / "smollm2_conversion.md").write_text("\n".join(lines) + "\n")
    return report
