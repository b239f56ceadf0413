#!/usr/bin/env python3
"""Score NVIDIA kvpress eviction presses at fixed KV budgets (CPU baseline runner).

What it computes
----------------
For every sequence i of an eval file (context [C], continuation [T], greedy G):

1. Prefill the context ([1, C]) into a fresh ``DynamicCache`` with the press
   active (``compression_ratio = 1 - budget``; budget = kept share of the
   context's KV).  kvpress compresses each layer's cache in a forward hook that
   runs *after* that layer's attention, so the prefill itself attends to the
   whole context: the logits of the last context position (which predict the
   first continuation token and give the first greedy token) equal the full
   model's.  That is how kvpress's own pipeline works.
2. ``kv_fraction``: K/V elements held by the cache right after the prefill,
   summed over layers, divided by C x layers x kv_heads x head_dim x 2.
3. With the press no longer active, feed the continuation teacher-forced
   through the compressed cache.  As in ``KVPressTextGenerationPipeline``
   (``generate_answer``), ``position_ids`` carry the true positions
   C..C+T-1 (RoPE), while ``cache_position`` is left to the model, which
   derives it from the compressed cache length (it indexes the cache/mask,
   not RoPE).  ``nll`` = mean NLL of the T continuation tokens; ``top1`` =
   share of the T positions whose argmax equals the full model's argmax.
4. The cache is cut back to its post-prefill length (as the pipeline does
   between questions), then G tokens are generated greedily from it;
   ``greedy`` = share of positions whose token equals the full model's greedy
   token at that position (position-wise; no stop at EOS, unlike the
   pipeline, so every row compares exactly G tokens).

Method ``full`` (no press, target 1.0) is the reference; it is run a second
time through the same code and compared with the reference run, so its top1
and greedy agreement (1.0) are checked, not assumed.

Output: one JSON line per (method, budget), appended with flush + fsync so a
run can resume; pairs already in the file are skipped (``--retry-errors`` also
re-runs pairs whose row has "error").  Progress goes to stderr.

How to run
----------
kvpress 0.5.5 needs transformers < 5.3, so this script runs from a side
install (``scripts/kvpress_env.sh`` -> ``.kvpress/``) that shadows .venv's
transformers; it must not import mixsga.  From the repository root::

    bash scripts/kvpress_env.sh
    OMP_NUM_THREADS=1 PYTHONPATH=.kvpress .venv/bin/python \\
        examples/python/mixsga_demo/kvpress_runner.py \\
        --model DIR --eval FILE --presses snapkv,expected_attention,knorm \\
        --budgets 0.5,0.25 --out rows.jsonl [--label NAME]

DIR: a ``save_pretrained`` directory of a LlamaForCausalLM (float32; saved by
a newer transformers is fine, the config fields that matter are cross-checked
after loading).  FILE: ``torch.save`` of {"context": LongTensor [N, C],
"continuation": LongTensor [N, T], "greedy": int G}.

Presses: snapkv, expected_attention, knorm, streaming_llm, tova,
observed_attention, pyramidkv, random.  kvpress defaults are used, except a
``window_size`` >= C (set to C // 4) or ``n_sink`` >= C (set to C // 8);
``--press-kwargs '{"snapkv": {"window_size": 32}}'`` overrides.  Every row's
"note" states the arguments used.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import traceback
from importlib import metadata

import torch

# name -> (kvpress class name, needs attention weights (eager attention), note)
PRESSES = {
    "snapkv": ("SnapKVPress", False,
               "scores by the attention of the last window_size context queries; the window itself is "
               "always kept, so when kept tokens per layer <= window_size it keeps only the most recent tokens"),
    "expected_attention": ("ExpectedAttentionPress", False,
                           "scores by expected attention of future queries (query mean/cov averaged over "
                           "n_future_positions RoPE positions) times ||V||; first n_sink tokens always kept"),
    "knorm": ("KnormPress", False, "keeps the keys with the smallest L2 norm; no arguments"),
    "streaming_llm": ("StreamingLLMPress", False,
                      "keeps n_sink first tokens + the most recent ones; keys are not re-rotated"),
    "tova": ("TOVAPress", False,
             "scores by the last context token's attention averaged over heads (same kept set for all kv heads); "
             "last token always kept"),
    "observed_attention": ("ObservedAttentionPress", True,
                           "H2O-like: average attention received over all context queries; needs attention "
                           "weights, so it runs with eager attention and is compared with a full-model reference "
                           "also run with eager attention"),
    "pyramidkv": ("PyramidKVPress", False,
                  "SnapKV scores with a per-layer budget pyramid (more tokens in lower layers, same total); "
                  "per-layer lengths differ, so the continuation is fed one token at a time"),
    "random": ("RandomPress", False, "keeps a random subset (seeded)"),
}


def log(msg: str) -> None:
    print(f"[kvpress_runner] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="save_pretrained directory (LlamaForCausalLM)")
    p.add_argument("--eval", required=True, help="torch.save'd dict context/continuation/greedy")
    p.add_argument("--presses", default="snapkv,expected_attention,knorm",
                   help=f"comma list from: {','.join(PRESSES)}")
    p.add_argument("--budgets", default="0.5,0.25", help="comma list of kept KV shares in (0, 1]")
    p.add_argument("--out", required=True, help="JSONL file (appended; existing pairs are skipped)")
    p.add_argument("--label", default=None, help="model label in rows (default: model dir name)")
    p.add_argument("--press-kwargs", default="{}",
                   help='JSON {press: {arg: value}} overriding kvpress defaults, e.g. {"snapkv": {"window_size": 32}}')
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                   help="attention implementation for presses that do not need attention weights")
    p.add_argument("--max-seqs", type=int, default=0, help="use only the first N sequences (0 = all)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--no-full", action="store_true", help="do not write the 'full' reference row")
    p.add_argument("--retry-errors", action="store_true", help="re-run pairs whose existing row has an error")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- model loading

def _rope_theta(cfg: dict):
    rp = cfg.get("rope_parameters") or {}
    if isinstance(rp, dict) and "rope_theta" in rp:
        return float(rp["rope_theta"])
    if cfg.get("rope_theta") is not None:
        return float(cfg["rope_theta"])
    return None


def load_model(model_dir: str, attn: str):
    """Load with the (older) transformers and check that nothing was silently lost.

    The directory may have been written by a newer transformers.  Unknown
    config keys are tolerated by from_pretrained, but a renamed field would
    silently fall back to a default (e.g. RoPE theta), so the fields the
    forward pass depends on are compared with the raw config.json, and missing
    or unexpected weights are errors.
    """
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=attn, output_loading_info=True)
    model.eval()
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise RuntimeError(f"weights did not load cleanly from {model_dir}: {bad}")

    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    cfg = model.config.to_dict()
    problems = []
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "hidden_act"):
        if key in raw and raw[key] is not None and cfg.get(key) != raw[key]:
            problems.append(f"{key}: config.json {raw[key]!r} vs loaded {cfg.get(key)!r}")
    want, got = _rope_theta(raw), _rope_theta(cfg)
    if want is not None and got != want:
        problems.append(f"rope_theta: config.json {want} vs loaded {got}")
    raw_rp, got_rp = raw.get("rope_parameters") or {}, cfg.get("rope_parameters") or {}
    if isinstance(raw_rp, dict) and raw_rp.get("rope_type", "default") != (got_rp or {}).get("rope_type", "default"):
        problems.append(f"rope_type: config.json {raw_rp.get('rope_type')!r} vs loaded {got_rp.get('rope_type')!r}")
    if problems:
        raise RuntimeError("config fields changed while loading with transformers "
                           f"{__import__('transformers').__version__}: " + "; ".join(problems))
    if next(model.parameters()).dtype != torch.float32:
        raise RuntimeError("model is not float32 after loading")
    return model


# --------------------------------------------------------------------------- presses

def build_press(name: str, budget: float, context_len: int, overrides: dict):
    """Return (press, needs_eager, note) for one (press, budget)."""
    import kvpress

    if name not in PRESSES:
        raise ValueError(f"unknown press {name!r}; known: {', '.join(PRESSES)}")
    cls_name, needs_eager, what = PRESSES[name]
    cls = getattr(kvpress, cls_name)
    ratio = 1.0 - budget
    if abs(ratio) < 1e-12:  # budget 1.0 -> exactly no compression
        ratio = 0.0
    kwargs = {}
    changed = []
    user = overrides.get(name, {})
    for f in dataclasses.fields(cls):
        if f.name == "compression_ratio" or f.name in user or f.default is dataclasses.MISSING:
            continue
        value = f.default
        # Defaults sized for long contexts: keep them unless they reach the context length.
        if f.name == "window_size" and isinstance(value, int) and value >= context_len:
            value = max(1, context_len // 4)
            changed.append(f"window_size {f.default}->{value} (default >= context {context_len})")
        if f.name == "n_sink" and isinstance(value, int) and value >= context_len:
            value = max(0, context_len // 8)
            changed.append(f"n_sink {f.default}->{value} (default >= context {context_len})")
        kwargs[f.name] = value
    if name == "random" and kwargs.get("seed") is None:
        kwargs["seed"] = 0  # reproducible rows
        changed.append("seed None->0")
    for k, v in user.items():
        kwargs[k] = v
        changed.append(f"{k}={v!r} (--press-kwargs)")
    press = cls(compression_ratio=ratio, **kwargs)
    shown = {k: v for k, v in kwargs.items() if isinstance(v, (int, float, bool, str))}
    note = f"{cls_name}(compression_ratio={ratio:.6g}, {', '.join(f'{k}={v}' for k, v in shown.items())}); {what}"
    if changed:
        note += "; changed from kvpress defaults: " + ", ".join(changed)
    n_kept = max(1, int(context_len * (1 - ratio)))
    if name == "snapkv" and 0 < ratio and n_kept <= kwargs.get("window_size", 0):
        note += f"; NOTE kept tokens per layer ({n_kept}) <= window_size: this row is pure recency"
    return press, needs_eager, note


# --------------------------------------------------------------------------- one sequence

def _layers(cache):
    return list(cache.layers)


@torch.no_grad()
def run_sequence(model, ctx: torch.Tensor, cont: torch.Tensor, n_greedy: int, press=None):
    """Prefill ctx (press active), then teacher-force cont and greedy-decode n_greedy tokens."""
    from transformers import DynamicCache

    cfg = model.config
    C, T = ctx.shape[1], cont.shape[1]
    cache = DynamicCache()
    with press(model) if press is not None else contextlib.nullcontext():
        # logits_to_keep=1: only the last context position's logits are needed.
        out = model(input_ids=ctx, past_key_values=cache, use_cache=True, logits_to_keep=1)
    last_logits = out.logits[0, -1].float()

    layers = _layers(cache)
    lens = [int(layer.keys.shape[-2]) for layer in layers]
    held = sum(layer.keys.numel() + layer.values.numel() for layer in layers)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    full = C * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2
    kv_fraction = held / full

    # Teacher-forced continuation: tokens cont[0..T-2] at true positions C..C+T-2
    # predict cont[1..T-1]; cont[0] is predicted by the prefill's last logits.
    logits = [last_logits.unsqueeze(0)]
    if T > 1:
        inp = cont[:, : T - 1]
        pos = torch.arange(C, C + T - 1).unsqueeze(0)
        if len(set(lens)) == 1:
            # One chunk: the model builds the causal mask from cache_position, which it
            # derives from the (compressed) cache length, so the mask lines up with the cache.
            logits.append(model(input_ids=inp, past_key_values=cache, position_ids=pos).logits[0].float())
        else:
            # Per-layer cache lengths differ (e.g. PyramidKV): a chunk mask sized from layer 0
            # would not fit the other layers; single-token steps need no mask.
            for j in range(T - 1):
                o = model(input_ids=inp[:, j:j + 1], past_key_values=cache, position_ids=pos[:, j:j + 1])
                logits.append(o.logits[0].float())
    logits = torch.cat(logits, 0)  # [T, V]
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = float(-logp.gather(1, cont[0].unsqueeze(1)).mean())
    argmax = logits.argmax(-1)

    # Back to the post-prefill cache, as KVPressTextGenerationPipeline does between questions.
    for layer, n in zip(_layers(cache), lens):
        layer.keys = layer.keys[:, :, :n]
        layer.values = layer.values[:, :, :n]

    greedy = [int(last_logits.argmax())]
    for k in range(1, n_greedy):
        o = model(input_ids=torch.tensor([[greedy[-1]]]), past_key_values=cache,
                  position_ids=torch.tensor([[C + k - 1]]))
        greedy.append(int(o.logits[0, -1].argmax()))
    return {"nll": nll, "argmax": argmax, "greedy": torch.tensor(greedy[:n_greedy], dtype=torch.long),
            "kv_fraction": kv_fraction, "lens": lens}


# --------------------------------------------------------------------------- rows

def read_done(path: str, retry_errors: bool) -> set:
    done = set()
    if not os.path.exists(path):
        return done
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if retry_errors and "error" in row:
                continue
            done.add((row.get("model"), row.get("method"), round(float(row.get("target", -1)), 9)))
    return done


def append_row(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)

    import transformers
    import kvpress  # noqa: F401  (patches attention functions on import)

    versions = {"transformers": transformers.__version__, "kvpress": metadata.version("kvpress"),
                "torch": torch.__version__}
    label = args.label or os.path.basename(os.path.normpath(args.model))
    presses = [p.strip() for p in args.presses.split(",") if p.strip()]
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    overrides = json.loads(args.press_kwargs)

    data = torch.load(args.eval, weights_only=True)
    context, continuation, n_greedy = data["context"].long(), data["continuation"].long(), int(data["greedy"])
    if context.dim() != 2 or continuation.dim() != 2 or context.shape[0] != continuation.shape[0]:
        raise ValueError(f"bad eval shapes: context {tuple(context.shape)}, continuation {tuple(continuation.shape)}")
    if args.max_seqs:
        context, continuation = context[: args.max_seqs], continuation[: args.max_seqs]
    N, C = context.shape
    T = continuation.shape[1]
    log(f"versions {versions}; model {args.model} label {label}; N={N} C={C} T={T} G={n_greedy}")

    done = read_done(args.out, args.retry_errors)
    key = lambda method, target: (label, method, round(float(target), 9))  # noqa: E731
    jobs = [] if args.no_full or key("full", 1.0) in done else [("full", 1.0)]
    jobs += [(p, b) for p in presses for b in budgets if key(f"kvpress:{p}", b) not in done]
    skipped = (0 if args.no_full else 1) + len(presses) * len(budgets) - len(jobs)
    if skipped:
        log(f"skipping {skipped} (method, budget) pairs already in {args.out}")
    if not jobs:
        log("nothing to do")
        return 0

    model = load_model(args.model, args.attn)
    common_note = ("prefill attends to the full context (kvpress compresses after each layer's attention), so the "
                   "first continuation token and first greedy token match the full model; continuation at positions "
                   "C..C+T-1 via position_ids, cache_position from the compressed cache length (as kvpress's pipeline)")

    refs = {}  # attention implementation -> list of per-sequence reference results

    def set_attn(impl):
        if model.config._attn_implementation != impl:
            model.set_attn_implementation(impl)

    def reference(impl):
        if impl not in refs:
            set_attn(impl)
            t0 = time.time()
            refs[impl] = [run_sequence(model, context[i:i + 1], continuation[i:i + 1], n_greedy)
                          for i in range(N)]
            log(f"reference ({impl}) done in {time.time() - t0:.1f}s; "
                f"nll {sum(r['nll'] for r in refs[impl]) / N:.4f}")
        return refs[impl]

    for name, budget in jobs:
        method = "full" if name == "full" else f"kvpress:{name}"
        t0 = time.time()
        row = {"model": label, "method": method, "target": budget}
        note = ""
        try:
            if name == "full":
                press, impl, note = None, args.attn, f"no press ({args.attn} attention); reference for top1/greedy"
            else:
                if not 0 < budget <= 1:
                    raise ValueError(f"budget {budget} outside (0, 1]")
                press, needs_eager, note = build_press(name, budget, C, overrides)
                impl = "eager" if needs_eager else args.attn
                note = f"{note}; {common_note}"
            ref = reference(impl)
            set_attn(impl)
            t0 = time.time()  # time the method itself, not the (shared) reference
            per = []
            for i in range(N):
                r = run_sequence(model, context[i:i + 1], continuation[i:i + 1], n_greedy, press)
                top1 = float((r["argmax"] == ref[i]["argmax"]).float().mean())
                greedy = float((r["greedy"] == ref[i]["greedy"]).float().mean()) if n_greedy else float("nan")
                per.append((r["nll"], top1, greedy, r["kv_fraction"]))
                log(f"{method} b={budget:g} seq {i + 1}/{N}: nll {r['nll']:.4f} top1 {top1:.3f} "
                    f"greedy {greedy:.3f} kv {r['kv_fraction']:.4f} lens {r['lens']}")
            nll = sum(p[0] for p in per) / N
            row.update({
                "kv_fraction": sum(p[3] for p in per) / N,
                "nll": nll,
                "ppl": math.exp(nll),
                "top1_agreement": sum(p[1] for p in per) / N,
                "greedy_agreement": sum(p[2] for p in per) / N,
                "per_sequence_nll": [p[0] for p in per],
                "per_sequence_top1": [p[1] for p in per],
                "per_sequence_greedy": [p[2] for p in per],
            })
            if name == "full" and (row["top1_agreement"] != 1.0 or row["greedy_agreement"] != 1.0):
                note += "; WARNING full run disagrees with the reference run (non-deterministic forward?)"
        except Exception as e:  # one failing press must not stop the others
            log(f"{method} b={budget:g} FAILED:\n{traceback.format_exc()}")
            row["error"] = f"{type(e).__name__}: {e}"
        row.update({"seconds": time.time() - t0, "versions": versions,
                    "n_sequences": N, "context_len": C, "continuation_len": T, "greedy_len": n_greedy,
                    "note": note})
        append_row(args.out, row)
        if "error" not in row:
            log(f"{method} b={budget:g}: kv {row['kv_fraction']:.4f} nll {row['nll']:.4f} "
                f"top1 {row['top1_agreement']:.3f} greedy {row['greedy_agreement']:.3f} ({row['seconds']:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
