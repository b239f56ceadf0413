"""`make demo`: the paper's protocol (METHOD.md, "The paper's experiments") at laptop scale.

A small Llama-style base model (4 KV heads) is trained from scratch on real English text (Debian's
jargon-text and fortunes), cached on disk, then every arm is continued for the same steps on the same
data: the base model itself (100 % KV), static GQA at 50 % (mean-pooled pairs of KV heads), and mixSGA
over group sizes (1, 2, 4) at 25 / 35 / 50 / 50 / 75 % (0:0:1, 1:1:8, 3:1:6, 1:1:2, 1:1:0). Each arm is
evaluated on held-out text (perplexity with expert-choice and with causal argmax prefill routing,
argmax-vs-expert-choice agreement) and by generating with its real cache (bytes per token measured
from the cache, decode tokens/s, realised decode routing ratios, a text sample).

Writes report.md, report.json and ppl_vs_kv.png into the output folder.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub

import torch  # noqa: E402

from .. import hf  # noqa: E402
from .corpus import load_corpus, split_texts, train_tokenizer  # noqa: E402
from .data import TokenBlocks  # noqa: E402
from .evaluate import perplexity  # noqa: E402
from .loop import TrainConfig, train  # noqa: E402

GROUPS = (1, 2, 4)
#: (arm name, method, ratios over GROUPS or None). The paper's Figure 3 configurations.
ARMS = [
    ("base (100%)", "base", None),
    ("GQA-50%", "gqa", None),
    ("mixSGA 3:1:6 (50%)", "mixsga", (0.3, 0.1, 0.6)),
    ("mixSGA 1:1:2 (50%)", "mixsga", (0.25, 0.25, 0.5)),
    ("mixSGA 0:0:1 (25%)", "mixsga", (0.0, 0.0, 1.0)),
    ("mixSGA 1:1:8 (35%)", "mixsga", (0.1, 0.1, 0.8)),
    ("mixSGA 1:1:0 (75%)", "mixsga", (0.5, 0.5, 0.0)),
]


@dataclasses.dataclass
class DemoConfig:
    """Sizes and steps of a demo run; ``quick()`` is the CI smoke configuration."""

    hidden: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    intermediate: int = 688
    vocab: int = 2048
    block: int = 128
    batch: int = 16
    base_steps: int = 500
    base_lr: float = 2e-3
    arm_steps: int = 120
    arm_lr: float = 5e-4
    aux_alpha: float = 0.1
    aux_loss: str = "sigmoid_ce"
    eval_blocks: int = 48
    prompt_tokens: int = 48
    new_tokens: int = 64
    max_chars: int | None = None
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=128, vocab=512, block=64, batch=8,
                   base_steps=25, arm_steps=6, eval_blocks=8, prompt_tokens=16, new_tokens=12, max_chars=120_000)


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _data(cfg: DemoConfig, cache_dir: Path):
    train_text, held_text = split_texts(load_corpus(cfg.max_chars), held_out_fraction=0.1)
    tokenizer = train_tokenizer(train_text, cfg.vocab, cache_dir)  # held-out text never seen
    train_ids = torch.tensor(tokenizer.encode(train_text).ids)
    held_ids = torch.tensor(tokenizer.encode(held_text).ids)
    frac = held_ids.numel() / (train_ids.numel() + held_ids.numel())
    return tokenizer, TokenBlocks(torch.cat([train_ids, held_ids]), cfg.block, held_out_fraction=frac)


def _base_model(cfg: DemoConfig, data: TokenBlocks, cache_dir: Path):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=max(512, cfg.block * 2), tie_word_embeddings=True)
    key = hashlib.sha256(json.dumps([config.to_dict(), dataclasses.asdict(cfg)], sort_keys=True, default=str).encode()
                         + data.train.numpy().tobytes()).hexdigest()[:16]
    path = cache_dir / f"base-{key}.pt"
    torch.manual_seed(cfg.seed)
    model = transformers.LlamaForCausalLM(config)
    if path.is_file():
        _log(f"base model: reusing {path}")
        model.load_state_dict(torch.load(path, map_location="cpu"))
        return model
    _log(f"base model: training from scratch ({cfg.base_steps} steps; cached afterwards)")
    train(model, data, TrainConfig(steps=cfg.base_steps, batch_size=cfg.batch, lr=cfg.base_lr,
                                   warmup_steps=max(1, cfg.base_steps // 20), seed=cfg.seed, description="base"))
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model


def _make_arm(base, method: str, ratios, cfg: DemoConfig):
    model = copy.deepcopy(base)
    if method == "gqa":
        return hf.to_gqa(model, kv_heads=cfg.kv_heads // 2)
    if method == "mixsga":
        return hf.convert(model, group_sizes=GROUPS, ratios=ratios, aux_alpha=cfg.aux_alpha, aux_loss=cfg.aux_loss)
    return model


def _set_prefill_routing(model, mode: str) -> None:
    for layer in hf.mixsga_layers(model):
        layer.prefill_routing = mode


@torch.no_grad()
def _agreement(model, blocks: torch.Tensor) -> float | None:
    """Mean over layers of argmax-vs-expert-choice agreement on held-out blocks (None without mixSGA)."""
    layers = hf.mixsga_layers(model)
    if not layers:
        return None
    captured: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(lambda m, args, kw, i=i: captured.__setitem__(i, args[0] if args else kw["hidden_states"]),
                                             with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model.eval()
        model(input_ids=blocks)
    finally:
        for h in hooks:
            h.remove()
    return sum(layers[i].routing_agreement(h).agreement for i, h in captured.items()) / len(captured)


def _cache_bytes_per_token(cache, model) -> float:
    if isinstance(cache, hf.MixSGACache):
        return float(cache.bytes_per_token())
    total, tokens = 0, 0
    for layer in getattr(cache, "layers", []):
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and k.numel():
            total += k.nbytes + v.nbytes
            tokens = k.shape[0] * k.shape[2]
    if tokens == 0:  # unknown Cache layout: the formula of a plain KV cache
        c = model.config
        d = c.hidden_size // c.num_attention_heads
        return 2.0 * c.num_hidden_layers * c.num_key_value_heads * d * next(model.parameters()).element_size()
    return total / tokens


@torch.no_grad()
def _generate(model, tokenizer, prompt: torch.Tensor, new_tokens: int) -> dict:
    model.eval()
    _set_prefill_routing(model, "expert_choice")
    model.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
    t0 = time.perf_counter()
    prefill = model.generate(prompt, max_new_tokens=1, do_sample=False, pad_token_id=0)
    t_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0, return_dict_in_generate=True)
    seconds = max(1e-9, time.perf_counter() - t0 - t_prefill)  # decode steps only
    cache = out.past_key_values
    ratios = cache.decode_ratios().tolist() if isinstance(cache, hf.MixSGACache) else None
    del prefill
    return {
        "kv_bytes_per_token": _cache_bytes_per_token(cache, model),
        "decode_tokens_per_s": (new_tokens - 1) * prompt.shape[0] / seconds,
        "decode_ratios": ratios,
        "sample": tokenizer.decode(out.sequences[0, prompt.shape[1]:].tolist()),
    }


def run(out_dir: Path, cfg: DemoConfig, threads: int = 2) -> dict:
    """Runs every arm and writes report.md, report.json and ppl_vs_kv.png into ``out_dir``; returns the report."""
    t_start = time.perf_counter()
    torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = out_dir / "cache"
    _log("data: Jargon File + fortunes, byte-level BPE")
    tokenizer, data = _data(cfg, cache_dir)
    _log(f"data: {data.train.numel():,} train / {data.held_out.numel():,} held-out tokens, vocab {cfg.vocab}")
    base = _base_model(cfg, data, cache_dir)
    held = data.held_out[: cfg.eval_blocks]
    prompt = data.held_out[-1:, : cfg.prompt_tokens]
    rows = []
    for name, method, ratios in ARMS:
        _log(f"arm {name}: {cfg.arm_steps} continued steps")
        model = _make_arm(base, method, ratios, cfg)
        t0 = time.perf_counter()
        result = train(model, data, TrainConfig(steps=cfg.arm_steps, batch_size=cfg.batch, lr=cfg.arm_lr,
                                                seed=cfg.seed + 1, description=name))
        row = {"arm": name, "method": method, "ratios": ratios, "train_seconds": time.perf_counter() - t0,
               "final_train_loss": result.losses[-1], "final_aux_loss": result.aux_losses[-1]}
        row["kv_fraction"] = hf.kv_fraction(model) if method == "mixsga" else (0.5 if method == "gqa" else 1.0)
        _set_prefill_routing(model, "expert_choice")
        row["ppl_expert_choice"] = perplexity(model, held)
        _set_prefill_routing(model, "argmax")
        row["ppl_argmax"] = perplexity(model, held)
        _set_prefill_routing(model, "expert_choice")
        row["agreement"] = _agreement(model, held)
        row.update(_generate(model, tokenizer, prompt, cfg.new_tokens))
        _log(f"arm {name}: ppl EC {row['ppl_expert_choice']:.2f}, argmax {row['ppl_argmax']:.2f}, "
             f"{row['kv_bytes_per_token']:.0f} B/token, {row['decode_tokens_per_s']:.1f} tok/s")
        rows.append(row)
    report = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "threads": threads, "torch": torch.__version__, "config": dataclasses.asdict(cfg),
        "wall_seconds": time.perf_counter() - t_start, "prompt": tokenizer.decode(prompt[0].tolist()), "arms": rows,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(render_markdown(report))
    plot(report, out_dir / "ppl_vs_kv.png")
    return report


def render_markdown(report: dict) -> str:
    lines = [
        "# mixSGA demo report", "",
        f"{report['date']}, {report['machine']}, {report['threads']} torch threads, torch {report['torch']}, "
        f"wall time {report['wall_seconds'] / 60:.1f} min. Config: `{json.dumps(report['config'])}`.", "",
        "| arm | KV budget | held-out ppl (expert choice) | held-out ppl (argmax) | KV bytes/token (measured) "
        "| decode tok/s | decode ratios | argmax/EC agreement |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["arms"]:
        ratios = "-" if r["decode_ratios"] is None else ":".join(f"{x:.2f}" for x in r["decode_ratios"])
        agree = "-" if r["agreement"] is None else f"{r['agreement']:.3f}"
        lines.append(f"| {r['arm']} | {r['kv_fraction']:.0%} | {r['ppl_expert_choice']:.2f} | {r['ppl_argmax']:.2f} | "
                     f"{r['kv_bytes_per_token']:.0f} | {r['decode_tokens_per_s']:.1f} | {ratios} | {agree} |")
    by = {r["arm"]: r for r in report["arms"]}
    gqa, mix = by["GQA-50%"], by["mixSGA 3:1:6 (50%)"]
    verdict = "beats" if mix["ppl_expert_choice"] < gqa["ppl_expert_choice"] else "does not beat"
    lines += ["", f"At a 50 % KV budget, mixSGA 3:1:6 {verdict} static GQA on held-out perplexity "
              f"({mix['ppl_expert_choice']:.2f} vs {gqa['ppl_expert_choice']:.2f} with expert-choice prefill; "
              f"{mix['ppl_argmax']:.2f} with causal argmax routing).", "",
              f"Prompt for the samples: `{report['prompt'][-200:]!r}`", ""]
    lines += [f"- **{r['arm']}**: `{r['sample'][:200]!r}`" for r in report["arms"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Perplexity against KV budget, one line per method (the paper's Figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    mix = sorted((r for r in report["arms"] if r["method"] == "mixsga" and r["arm"] != "mixSGA 1:1:2 (50%)"),
                 key=lambda r: r["kv_fraction"])
    for key, style, label in (("ppl_expert_choice", "o-", "mixSGA (expert-choice prefill)"),
                              ("ppl_argmax", "s--", "mixSGA (causal argmax routing)")):
        ax.plot([100 * r["kv_fraction"] for r in mix], [r[key] for r in mix], style, label=label)
    for r in report["arms"]:
        if r["arm"] == "mixSGA 1:1:2 (50%)":
            ax.plot(50, r["ppl_expert_choice"], "D", label="mixSGA 1:1:2 (expert choice)")
        elif r["method"] == "gqa":
            ax.plot(50, r["ppl_expert_choice"], "^", markersize=9, label="static GQA (mean-pooled)")
        elif r["method"] == "base":
            ax.plot(100, r["ppl_expert_choice"], "*", markersize=12, label="base model (full KV)")
    ax.set_xlabel("KV cache budget (% of the base model)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("Perplexity vs KV budget (continued pretraining, same steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check(out_dir: Path) -> None:
    """Every output file exists and every figure in report.json is finite (the CI check of --quick)."""
    for name in ("report.md", "report.json", "ppl_vs_kv.png"):
        if not (out_dir / name).is_file() or (out_dir / name).stat().st_size == 0:
            raise RuntimeError(f"out: {out_dir / name} is missing or empty")
    report = json.loads((out_dir / "report.json").read_text())
    if len(report["arms"]) != len(ARMS):
        raise RuntimeError(f"report.json: expected {len(ARMS)} arms, got {len(report['arms'])}")
    for r in report["arms"]:
        for key in ("ppl_expert_choice", "ppl_argmax", "kv_bytes_per_token", "decode_tokens_per_s", "kv_fraction"):
            if not (isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0):
                raise RuntimeError(f"report.json: arm {r['arm']!r} has {key} = {r[key]!r}")
