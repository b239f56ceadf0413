"""What users would pick instead of mixSGA at equal KV bytes (issue 23, item 4).

Two models: SmolLM2-135M (3 KV heads, the offline GGUF) and the regime study's test-bed (a small Llama with
8 KV heads, trained from scratch and cached). At about 50 % and 25 % of the full KV bytes each is served by

- the full model (the reference every agreement is measured against);
- a quantized KV cache (transformers' ``QuantizedCache``: HQQ for int8, optimum-quanto and HQQ for int4,
  quanto for int2), groups along the head dimension;
- kvpress presses (SnapKV, ExpectedAttention, Knorm), run by ``kvpress_runner.py`` in its own environment
  (``.kvpress``) on the eval file and the saved model this module writes;
- mixSGA converted with the recommended extensions, prepared and decode-calibrated, with no training;
- mixSGA and static GQA (mean-pooled KV heads) after a short uptraining (the paper's regime); on the
  test-bed mixSGA also with the hard per-sequence cap (``kv_cap``), pools growing or reserved once.

Protocol (the same as the kvpress runner's): N held-out sequences, each a context of C tokens and a
continuation of T tokens. The context is prefilled into the method's cache; the continuation is then fed
token by token through that cache (teacher forcing). ``nll``: mean NLL of the T continuation tokens (the
first predicted by the prefill's last logits); ``top1``: share of those T positions whose argmax is the
full model's; ``greedy``: G tokens generated greedily from the context, position-wise share equal to the
full model's greedy tokens. ``kv_fraction``: bytes of the context's cache over a bf16 full cache of the same
tokens. Every (model, method, target, seed) is one JSON row in <out>/rows.jsonl, appended as it ends;
rows already there are skipped, so an interrupted run resumes. The report (tables, plot, ``check``) is in
kv_alternatives_report.py.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .kv_alternatives_report import (  # noqa: F401  (check, paired_difference, summarise: the module's API)
    FAMILIES,
    SMOLLM2,
    TESTBED,
    check,
    paired_difference,
    plot,
    render_markdown,
    summarise,
)
from .reports import append_row, read_rows

MODEL_KEYS = {"smollm2": SMOLLM2, "testbed": TESTBED}
#: Bytes of one element of the reference (full) cache: bf16.
FULL_ELEMENT_BYTES = 2
#: Bytes of one quantization parameter (scale or zero point), counted at bf16.
QPARAM_BYTES = 2
PRESSES = ("snapkv", "expected_attention", "knorm")
TARGETS = (0.5, 0.25)


def _log(msg: str) -> None:
    print(f"[kv-alt {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclasses.dataclass(frozen=True)
class Protocol:
    """N sequences of a C-token context and a T-token continuation; G greedy tokens."""

    n: int
    context: int
    continuation: int
    greedy: int

    def __post_init__(self) -> None:
        for name in ("n", "context", "continuation", "greedy"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")


PROTOCOLS = {SMOLLM2: Protocol(16, 256, 64, 32), TESTBED: Protocol(64, 96, 32, 16)}
QUICK_PROTOCOLS = {SMOLLM2: Protocol(2, 32, 8, 4), TESTBED: Protocol(4, 24, 8, 4)}


# --- Eval set ---------------------------------------------------------------------------------------------

def eval_set_from_blocks(blocks: torch.Tensor, protocol: Protocol) -> dict:
    """{"context": [N, C], "continuation": [N, T], "greedy": G} from token blocks [N, >= C + T]: the format
    of the kvpress runner's eval file."""
    need = protocol.context + protocol.continuation
    if blocks.dim() != 2 or blocks.shape[1] < need or blocks.shape[0] != protocol.n:
        raise ValueError(f"blocks: expected [{protocol.n}, >= {need}], got {list(blocks.shape)}")
    blocks = blocks.long()
    return {"context": blocks[:, : protocol.context].contiguous(),
            "continuation": blocks[:, protocol.context: need].contiguous(), "greedy": protocol.greedy}


def evenly_spaced(items_count: int, n: int) -> list[int]:
    """n indices spread evenly over range(items_count), first and last included."""
    if items_count < n:
        raise ValueError(f"need {n} items, only {items_count} available")
    if n == 1:
        return [0]
    return [round(i * (items_count - 1) / (n - 1)) for i in range(n)]


def document_blocks(tokenizer, docs, n: int, length: int) -> torch.Tensor:
    """[n, length]: the first ``length`` tokens of n documents, chosen evenly among those that have that
    many tokens (documents in the given order)."""
    heads = []
    for d in docs:
        ids = tokenizer(d.text, add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            heads.append(ids[:length])
    return torch.tensor([heads[i] for i in evenly_spaced(len(heads), n)])


# --- Caches and their bytes -------------------------------------------------------------------------------

def full_cache_bytes(num_layers: int, kv_heads: int, head_dim: int, tokens: int) -> int:
    """Bytes of a bf16 full KV cache: K and V, every layer, every token."""
    return 2 * num_layers * kv_heads * head_dim * tokens * FULL_ELEMENT_BYTES


def quantized_fraction_formula(nbits: int, group_size: int) -> float:
    """kv_fraction of a fully quantized cache: nbits per element plus a scale and a zero point (bf16) per
    group of ``group_size`` elements, over 16 bits per element."""
    return (nbits / 8 + 2 * QPARAM_BYTES / group_size) / FULL_ELEMENT_BYTES


def _quantized_payload(q) -> tuple[int, float]:
    """(elements, bytes) of one quantized tensor of transformers' HQQ or quanto layers."""
    if isinstance(q, tuple):  # HQQ: (packed ints, meta)
        meta = q[1]
        elements = math.prod(meta["shape"])
        params = meta["scale"].numel() + meta["zero"].numel()
        return elements, elements * meta["nbits"] / 8 + params * QPARAM_BYTES
    elements = q.numel()  # optimum-quanto WeightQBitsTensor
    params = q._scale.numel() + q._shift.numel()
    return elements, elements * q.qtype.bits / 8 + params * QPARAM_BYTES


def quantized_cache_bytes(cache) -> tuple[int, float]:
    """(elements, bytes) held by a transformers QuantizedCache: the quantized states (payload at their bits,
    scales and zero points at bf16) and the residual (recent, unquantized) states at bf16."""
    elements, nbytes = 0, 0.0
    for layer in cache.layers:
        for q in (layer._quantized_keys, layer._quantized_values):
            if q is not None:
                e, b = _quantized_payload(q)
                elements, nbytes = elements + e, nbytes + b
        for r in (layer.keys, layer.values):
            if r is not None and r.dim() == 4:
                elements += r.numel()
                nbytes += r.numel() * FULL_ELEMENT_BYTES
    return elements, nbytes


def _base_geometry(config) -> tuple[int, int, int]:
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, config.num_key_value_heads, head_dim


@dataclasses.dataclass
class CacheKind:
    """How a method stores its KV: ``make()`` a fresh cache; ``fraction(cache, tokens)`` its bytes over a
    bf16 full cache of the base model holding ``tokens`` tokens (summed over the batch)."""

    name: str
    make: Callable[[], object]
    fraction: Callable[[object, int], float]
    copyable: bool = True  #: a deepcopy after the prefill serves the greedy run (else it prefills again)


def dynamic_cache_kind(model, base_config) -> CacheKind:
    """A transformers DynamicCache (the full model, or static GQA whose layers store fewer heads)."""
    from transformers import DynamicCache

    layers, kv, d = _base_geometry(base_config)

    def fraction(cache, tokens):
        stored = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
        return stored * FULL_ELEMENT_BYTES / full_cache_bytes(layers, kv, d, tokens)

    return CacheKind("dynamic", lambda: DynamicCache(config=model.config), fraction)


def quantized_cache_kind(model, backend: str, nbits: int, group_size: int, residual_length: int) -> CacheKind:
    """transformers' QuantizedCache with groups of ``group_size`` consecutive elements of one head of one
    token (``group_size`` divides the head dim): HQQ quantizes along axis 1 of its [-1, group] view, quanto
    along axis 0 (per-group scales of the last dimension). The prefill's states are quantized as they are
    stored; afterwards up to ``residual_length`` - 1 recent tokens wait unquantized (counted at bf16)."""
    from transformers import QuantizedCache

    layers, kv, d = _base_geometry(model.config)
    if d % group_size:
        raise ValueError(f"group_size: {group_size} does not divide the head dim {d}")
    axis = {"hqq": 1, "quanto": 0}[backend]

    def make():
        return QuantizedCache(backend, model.config, nbits=nbits, axis_key=axis, axis_value=axis,
                              q_group_size=group_size, residual_length=residual_length)

    def fraction(cache, tokens):
        return quantized_cache_bytes(cache)[1] / full_cache_bytes(layers, kv, d, tokens)

    return CacheKind(f"{backend} int{nbits}", make, fraction)


def mixsga_cache_kind(model, kv_cap: float | None = None, max_length: int | None = None) -> CacheKind:
    """The compact MixSGACache: its stored bytes over the full bytes of the same tokens (both in the
    model's dtype; the expert index bytes included). ``kv_cap``: the hard per-sequence cap (None: the model's
    own, if any); ``max_length``: with a cap, pools reserved once for that many tokens per sequence."""
    from mixsga import hf

    def fraction(cache, tokens):
        return cache.stored_bytes_per_token() / cache.full_bytes_per_token()

    return CacheKind("mixsga", lambda: hf.MixSGACache(model.config, kv_cap=kv_cap, max_length=max_length), fraction,
                     copyable=False)


# --- Running the protocol ---------------------------------------------------------------------------------

def _step(model, ids, cache, keep_last: bool = True):
    kwargs = {"logits_to_keep": 1} if keep_last else {}
    return model(input_ids=ids, past_key_values=cache, use_cache=True, **kwargs).logits[:, -1].double()


def _copy_or_none(cache):
    """A deep copy of a cache after the prefill (the greedy run's start), or None when it cannot be copied
    (optimum-quanto tensors, the compact C++ cache): the greedy run then prefills again (deterministic)."""
    try:
        return copy.deepcopy(cache)
    except (TypeError, RuntimeError):
        return None


@torch.no_grad()
def run_protocol(model, eval_set: dict, kind: CacheKind, batch_size: int = 64) -> dict:
    """Runs one method on the eval set. Returns per sequence (torch tensors): ``nll`` [N, T] (float64,
    per continuation token), ``argmax`` [N, T] (the predicted token at each continuation position, teacher
    forced), ``greedy`` [N, G] (free-running greedy tokens), ``kv_fraction`` (the context's cache, over
    the batches' tokens), ``kv_fraction_end`` (after the continuation) and ``caches`` (the teacher-forced
    caches of the batches, for inspection)."""
    was_training = model.training
    model.eval()
    context, continuation, n_greedy = eval_set["context"], eval_set["continuation"], int(eval_set["greedy"])
    device = next(model.parameters()).device
    nll, argmax, greedy = [], [], []
    ctx_fraction, end_fraction, weights, caches = [], [], [], []
    try:
        for i in range(0, context.shape[0], batch_size):
            ctx = context[i: i + batch_size].to(device)
            cont = continuation[i: i + batch_size].to(device)
            b, c, t = ctx.shape[0], ctx.shape[1], cont.shape[1]
            cache = kind.make()
            first = _step(model, ctx, cache)
            ctx_fraction.append(kind.fraction(cache, b * c))
            weights.append(b)
            fork = _copy_or_none(cache) if kind.copyable else None
            # Teacher forcing through the cache.
            logits, step_nll, step_argmax = first, [], []
            for j in range(t):
                if j > 0:
                    logits = _step(model, cont[:, j - 1: j], cache)
                step_nll.append(torch.nn.functional.cross_entropy(logits, cont[:, j], reduction="none"))
                step_argmax.append(logits.argmax(-1))
            end_fraction.append(kind.fraction(cache, b * (c + t - 1)))
            caches.append(cache)
            nll.append(torch.stack(step_nll, 1).cpu())
            argmax.append(torch.stack(step_argmax, 1).cpu())
            # Greedy generation from the context.
            if fork is None:
                fork = kind.make()
                logits = _step(model, ctx, fork)
            else:
                logits = first
            tokens = [logits.argmax(-1)]
            for _ in range(n_greedy - 1):
                tokens.append(_step(model, tokens[-1][:, None], fork).argmax(-1))
            greedy.append(torch.stack(tokens, 1).cpu())
    finally:
        model.train(was_training)
    total = sum(weights)
    return {"nll": torch.cat(nll), "argmax": torch.cat(argmax), "greedy": torch.cat(greedy),
            "kv_fraction": sum(f * w for f, w in zip(ctx_fraction, weights)) / total,
            "kv_fraction_end": sum(f * w for f, w in zip(end_fraction, weights)) / total, "caches": caches}


def score(result: dict, reference: dict) -> dict:
    """Per-sequence metrics of a run against the full model's run: mean NLL, top-1 agreement (teacher
    forced) and greedy agreement (position-wise), and their means (ppl = exp(mean nll))."""
    per_nll = result["nll"].double().mean(1)
    per_top1 = (result["argmax"] == reference["argmax"]).double().mean(1)
    per_greedy = (result["greedy"] == reference["greedy"]).double().mean(1)
    nll = float(per_nll.mean())
    return {"nll": nll, "ppl": math.exp(nll), "top1_agreement": float(per_top1.mean()),
            "greedy_agreement": float(per_greedy.mean()), "per_sequence_nll": per_nll.tolist(),
            "per_sequence_top1": per_top1.tolist(), "per_sequence_greedy": per_greedy.tolist()}


def versions() -> dict:
    out = {}
    for pkg in ("torch", "transformers", "hqq", "optimum-quanto", "mixsga"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


# --- Rows file --------------------------------------------------------------------------------------------

def row_key(row: dict) -> tuple:
    return (row["model"], row["method"], round(float(row["target"]), 6), row.get("seed"))


def done_keys(path: Path) -> set:
    """Keys of the rows with a result (error and not-run rows are retried)."""
    return {row_key(r) for r in read_rows(path) if r.get("nll") is not None}


# --- Methods on a model -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Task:
    """One trained or converted model and the rows it yields: ``keys`` [(method, target, seed)];
    ``run(ctx)`` returns the rows."""

    keys: list[tuple]
    run: Callable[["ModelContext"], list[dict]]
    label: str


class ModelContext:
    """Lazily loaded state of one model: its base, data, eval set and full-model reference."""

    def __init__(self, name: str, out: Path, protocol: Protocol, loader, quick: bool) -> None:
        self.name, self.out, self.protocol, self.quick = name, Path(out), protocol, quick
        self._loader = loader
        self._state: dict | None = None
        self._cached: dict = {}
        self.slug = "smollm2" if name == SMOLLM2 else "testbed"
        self.eval_path = self.out / f"eval_{self.slug}.pt"
        self.reference_path = self.out / f"reference_{self.slug}.pt"
        self.model_dir = self.out / f"hf_{self.slug}"

    @property
    def state(self) -> dict:
        if self._state is None:
            t0 = time.perf_counter()
            self._state = self._loader()
            _log(f"{self.name}: base and data loaded in {time.perf_counter() - t0:.0f} s")
        return self._state

    @property
    def base(self):
        return self.state["base"]

    @property
    def eval_set(self) -> dict:
        """Built once and saved (<out>/eval_<model>.pt, the kvpress runner's input): a resumed run reads it."""
        if "eval_set" in self._cached:
            return self._cached["eval_set"]
        if self.eval_path.is_file():
            es = torch.load(self.eval_path)
        else:
            es = eval_set_from_blocks(self.state["eval_blocks"], self.protocol)
            self.out.mkdir(parents=True, exist_ok=True)
            torch.save(es, self.eval_path)
        expected = (self.protocol.n, self.protocol.context, self.protocol.continuation, self.protocol.greedy)
        got = (*es["context"].shape, es["continuation"].shape[1], int(es["greedy"]))
        if got != expected:
            raise RuntimeError(f"{self.eval_path}: holds N, C, T, G = {got}, the protocol says {expected}")
        self._cached["eval_set"] = es
        return es

    @property
    def reference(self) -> dict:
        """The full model's run (DynamicCache), saved to <out>/reference_<model>.pt."""
        if "reference" in self._cached:
            return self._cached["reference"]
        if self.reference_path.is_file():
            self._cached["reference"] = torch.load(self.reference_path)
            return self._cached["reference"]
        t0 = time.perf_counter()
        result = run_protocol(self.base, self.eval_set, dynamic_cache_kind(self.base, self.base.config))
        ref = {"nll": result["nll"], "argmax": result["argmax"], "greedy": result["greedy"],
               "kv_fraction": result["kv_fraction"], "seconds": time.perf_counter() - t0}
        torch.save(ref, self.reference_path)
        self._cached["reference"] = ref
        return ref

    def row(self, method: str, target: float, seed, family: str, result: dict, seconds: float, note: str = "",
            details: dict | None = None) -> dict:
        return {"model": self.name, "method": method, "target": target, "seed": seed, "family": family,
                "kv_fraction": result["kv_fraction"], **score(result, self.reference), "seconds": seconds,
                "versions": versions(), "note": note,
                "details": {"kv_fraction_end": result["kv_fraction_end"], **(details or {})}}


def evaluate_kind(ctx: ModelContext, model, kind: CacheKind, method: str, target: float, seed, family: str,
                  note: str = "", details: dict | None = None) -> dict:
    t0 = time.perf_counter()
    result = run_protocol(model, ctx.eval_set, kind)
    row = ctx.row(method, target, seed, family, result, time.perf_counter() - t0, note, details)
    if kind.name == "mixsga":
        caches = [c for c in result["caches"] if c.hetero is not None]
        ratios = [c.decode_ratios().tolist() for c in caches]
        if ratios:
            row["details"]["decode_ratios_continuation"] = [statistics.fmean(r[e] for r in ratios)
                                                            for e in range(len(ratios[0]))]
        if caches:
            # After the continuation: what the pools hold in memory, and the fullest (sequence, layer) pair.
            full = sum(c.full_bytes_per_token() * c.tokens_stored() for c in caches)
            row["details"]["allocated_fraction_end"] = sum(c.bytes_allocated() for c in caches) / full
            row["details"]["stored_fraction_end"] = sum(c.bytes_stored() for c in caches) / full
            row["details"]["largest_sequence_share_end"] = max(_largest_share(c) for c in caches)
    return row


def _largest_share(cache) -> float:
    """The largest K/V share of the full cache any (sequence, layer) pair of a MixSGACache stores."""
    inverse = torch.tensor([1.0 / g for g in cache.hetero.options.group_sizes], dtype=torch.float64)
    shares = []
    for layer in range(len(cache.layers)):
        lengths = cache.hetero.lengths(layer).to(torch.float64)
        shares.append(float(((lengths * inverse).sum(1) / lengths.sum(1).clamp_min(1)).max()))
    return max(shares)


#: (prefill routing, hard cap, pools reserved, method-name suffix) of the mixSGA rows; the capped ones route as
#: decoding does, so they read against the "[argmax prefill]" row (calibrated offsets alone).
MIXSGA_MODES = (("expert_choice", False, False, ""), ("argmax", False, False, " [argmax prefill]"))
CAPPED_MODES = (("argmax", True, False, " [argmax prefill, cap]"),
                ("argmax", True, True, " [argmax prefill, cap, reserved]"))


def evaluate_mixsga(ctx: ModelContext, model, method: str, target: float, seed, family: str, note: str = "",
                    details: dict | None = None, capped: bool = False, modes=MIXSGA_MODES) -> list[dict]:
    """Rows of a converted model under each prefill routing (``expert_choice``: the configured capacities;
    ``argmax``: causal, as decoding routes; its method name gets " [argmax prefill]"), and with ``capped``
    also with the hard cap at ``target`` (``kv_cap``), the pools growing or reserved once for the longest
    sequence the protocol stores. ``modes``: a subset of MIXSGA_MODES."""
    from mixsga import hf

    layers = hf.mixsga_layers(model)
    es = ctx.eval_set
    longest = es["context"].shape[1] + max(es["continuation"].shape[1], int(es["greedy"]))
    rows = []
    try:
        for mode, cap, reserved, suffix in modes + (CAPPED_MODES if capped else ()):
            for layer in layers:
                layer.prefill_routing = mode
            kind = mixsga_cache_kind(model, target if cap else None, longest if reserved else None)
            rows.append(evaluate_kind(ctx, model, kind, f"{method}{suffix}", target, seed, family, note,
                                      {**(details or {}), "prefill_routing": mode, "kv_cap": target if cap else None,
                                       "reserved": reserved}))
    finally:
        for layer in layers:
            layer.prefill_routing = "expert_choice"
    return rows


def mixsga_keys(method: str, target: float, seed, capped: bool = False) -> list[tuple]:
    return [(f"{method}{m[3]}", target, seed) for m in MIXSGA_MODES + (CAPPED_MODES if capped else ())]


#: (label, backend, nbits, target) of the quantized caches; int8 only exists in HQQ, quanto offers 2 and 4 bits.
QUANTIZED = (("int8 (hqq)", "hqq", 8, 0.5), ("int4 (quanto)", "quanto", 4, 0.25), ("int4 (hqq)", "hqq", 4, 0.25),
             ("int2 (quanto)", "quanto", 2, 0.25))


def quantized_tasks(ctx: ModelContext, group_size: int, residual_length: int, which=QUANTIZED) -> list[Task]:
    tasks = []
    for label, backend, nbits, target in which:
        method = f"KV {label}, group {group_size}"

        def run(c, backend=backend, nbits=nbits, target=target, method=method):
            kind = quantized_cache_kind(c.base, backend, nbits, group_size, residual_length)
            note = (f"{backend} QuantizedCache, {nbits} bits, groups of {group_size} along the head dim, scale and "
                    f"zero point per group counted at bf16; residual_length {residual_length} (the prefill is quantized "
                    f"as stored; its own attention and up to {residual_length - 1} recent decoded tokens are not)")
            return [evaluate_kind(c, c.base, kind, method, target, None, "quantized KV", note,
                                  {"backend": backend, "nbits": nbits, "q_group_size": group_size,
                                   "residual_length": residual_length,
                                   "formula_fraction": quantized_fraction_formula(nbits, group_size)})]

        tasks.append(Task([(method, target, None)], run, method))
    return tasks


def full_task() -> Task:
    def run(c):
        ref = c.reference
        result = {"nll": ref["nll"], "argmax": ref["argmax"], "greedy": ref["greedy"],
                  "kv_fraction": ref["kv_fraction"], "kv_fraction_end": 1.0}
        return [c.row("full", 1.0, None, "full", result, ref["seconds"], "DynamicCache, the reference")]

    return Task([("full", 1.0, None)], run, "full")


# --- The test-bed -----------------------------------------------------------------------------------------

def testbed_loader(cfg, cache_dir: Path, protocol: Protocol):
    def load():
        from mixsga_demo import regime
        from mixsga_demo.study import build_data

        _, data, counts = build_data(cfg, cache_dir)
        held = regime.held_out_blocks(cfg, data)
        base, base_tokens, _ = regime._base(cfg, data, cache_dir, held)
        base.eval()
        picks = evenly_spaced(data.held_out.shape[0], protocol.n)
        return {"base": base, "data": data, "cfg": cfg, "base_tokens": base_tokens, "held": held,
                "eval_blocks": data.held_out[picks], "counts": counts}

    return load


def testbed_calibration(cfg, data, arm, seed: int) -> torch.Tensor:
    """The blocks regime.calibrated_decode fits the decode offsets on (the same draw)."""
    n = max(cfg.prepare_blocks, math.ceil(100 * len(arm.groups) / cfg.block))
    g = torch.Generator().manual_seed(3000 + seed)
    return data.train[torch.randperm(data.train.shape[0], generator=g)[:n]]


def _regime_reference(regime_runs: Path | None, arm_name: str, seed: int, budget: float) -> float | None:
    if regime_runs is None or not Path(regime_runs).is_file():
        return None
    for r in read_rows(regime_runs):
        if (r.get("arm"), r.get("seed"), r.get("budget")) == (arm_name, seed, budget):
            return r.get("ppl_expert_choice")
    return None


def testbed_tasks(arms, seeds, budget: float, regime_runs: Path | None) -> list[Task]:
    """Per arm and seed: at conversion (budget 0) and after uptraining for ``budget`` of the base's
    pretraining tokens, as regime._run_one builds, trains and calibrates it."""
    tasks = []
    for stage in ("conversion", "uptrained"):
        for arm in arms:
            arm_seeds = seeds if (arm.method == "mixsga" or stage == "uptrained") else (None,)
            for seed in arm_seeds:
                kind = "mixSGA" if arm.method == "mixsga" else "GQA"
                family = f"{kind} at conversion" if stage == "conversion" else f"{kind} uptrained"
                method = f"{arm.name} @ conversion" if stage == "conversion" else f"{arm.name} @ uptrained {100 * budget:g} %"
                keys = (mixsga_keys(method, arm.budget, seed, capped=True) if arm.method == "mixsga"
                        else [(method, arm.budget, seed)])

                def run(c, arm=arm, seed=seed, stage=stage, method=method, family=family):
                    return _testbed_arm(c, arm, seed, stage, budget, method, family, regime_runs)

                tasks.append(Task(keys, run, f"{method}, seed {seed}"))
    return tasks


def _testbed_arm(c: ModelContext, arm, seed, stage: str, budget: float, method: str, family: str,
                 regime_runs: Path | None) -> list[dict]:
    from mixsga import hf
    from mixsga.train.evaluate import perplexity
    from mixsga.train.loop import TrainConfig, train
    from mixsga_demo import regime
    from mixsga_demo.study import lr_multipliers, make_arm

    st = c.state
    cfg, data = st["cfg"], st["data"]
    t0 = time.perf_counter()
    model, info = make_arm(c.base, arm, cfg, data, 0 if seed is None else seed)
    details = {"arm": arm.name, "stage": stage}
    if stage == "uptrained":
        steps = regime.uptrain_steps(cfg, budget, st["base_tokens"])
        tc = TrainConfig(steps=steps, batch_size=cfg.batch, lr=cfg.uptrain_lr, seed=100 + seed, progress=False,
                         lr_multipliers=lr_multipliers(model, cfg, arm))
        train(model, data, tc)
        details.update(steps=steps, tokens=steps * cfg.batch * cfg.block, budget_of_base_tokens=budget)
    model.eval()
    details["train_seconds"] = time.perf_counter() - t0
    # The same held-out perplexity the regime study reports, to check this is its model.
    details["held_out_ppl_expert_choice"] = perplexity(model, st["held"])
    ref = _regime_reference(regime_runs, arm.name, seed, budget if stage == "uptrained" else 0.0)
    if ref is not None:
        details["regime_study_ppl_expert_choice"] = ref
    if arm.method != "mixsga":
        return [evaluate_kind(c, model, dynamic_cache_kind(model, c.base.config), method, arm.budget, seed, family,
                              "static GQA, mean-pooled KV heads (DynamicCache)", details)]
    calib = testbed_calibration(cfg, data, arm, seed)
    details["decode_budget_calibration_text"] = hf.calibrate_decode_routing(model, calib)
    details["decode_budget_held_out"] = hf.realised_kv_budget(model, st["held"])
    note = (f"groups {arm.groups}, ratios {tuple(round(r, 4) for r in arm.ratios)}, options {dict(arm.options)}; "
            "decode routing calibrated on training blocks (hf.calibrate_decode_routing)")
    return evaluate_mixsga(c, model, method, arm.budget, seed, family, note, details, capped=True)


# --- SmolLM2 ----------------------------------------------------------------------------------------------

SMOLLM2_UPTRAIN = {"steps": 12, "batch": 4, "block": 128, "lr": 2e-4, "precision": "bf16"}


def smollm2_loader(protocol: Protocol, calib_docs: int, calib_block: int, uptrain: dict):
    def load():
        from mixsga.models import load_gguf_llama, smollm2_gguf_path
        from mixsga_demo import smollm2_uptrain
        from mixsga_demo.corpus import load_documents, split_documents

        base, tokenizer = load_gguf_llama(smollm2_gguf_path())
        base.config.use_cache = False
        base.eval()
        train_docs, held_docs = split_documents(load_documents(), held_out_fraction=0.05)
        blocks = document_blocks(tokenizer, held_docs, protocol.n, protocol.context + protocol.continuation)
        # Calibration text as examples/python/kv_budget.py takes it: the first block of training documents.
        calib = []
        for doc in train_docs[::20]:
            ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
            if len(ids) >= calib_block:
                calib.append(ids[:calib_block])
            if len(calib) == calib_docs:
                break
        return {"base": base, "tokenizer": tokenizer, "eval_blocks": blocks, "calib": torch.tensor(calib),
                "uptrain_data": lambda: smollm2_uptrain.build_data(
                    tokenizer, uptrain["steps"] * uptrain["batch"], uptrain["block"], 1)}

    return load


def smollm2_tasks(seeds, uptrain: dict, router_steps: int = 200) -> list[Task]:
    from mixsga_demo import smollm2_uptrain as su

    tasks = []
    conv = "mixSGA E1-E3 1:3 (50%) @ conversion"
    conv33 = "mixSGA E1-E3 1:3 served at 1/3 @ conversion"

    def run_conversion(c):
        from mixsga import hf

        t0 = time.perf_counter()
        torch.manual_seed(1000)
        model = hf.convert(copy.deepcopy(c.base), group_sizes=su.GROUP_SIZES, ratios=su.RATIOS, **hf.RECOMMENDED)
        prepared = hf.prepare(model, c.state["calib"], router_steps=router_steps)
        model.eval()
        details = {"prepare_seconds": time.perf_counter() - t0, "key_scales": prepared["key_scales"],
                   "router_agreement": prepared["router_agreement"]}
        details["decode_budget_calibration_text"] = hf.calibrate_decode_routing(model, c.state["calib"])
        note = ("groups (1, 3), ratios (0.25, 0.75), hf.RECOMMENDED, hf.prepare, decode routing calibrated on "
                "training documents; no training")
        rows = evaluate_mixsga(c, model, conv, 0.5, 0, "mixSGA at conversion", note, details)
        d33 = {"decode_budget_calibration_text": hf.set_kv_budget(model, c.state["calib"], 1 / 3)}
        rows += evaluate_mixsga(c, model, conv33, 0.25, 0, "mixSGA at conversion",
                                "25 % is not reachable with group sizes (1, 3) (floor 1/3): the same converted model "
                                "served at 1/3 (hf.set_kv_budget), i.e. every token on the coarse expert", d33,
                                modes=MIXSGA_MODES[:1])
        return rows

    tasks.append(Task(mixsga_keys(conv, 0.5, 0) + [(conv33, 0.25, 0)], run_conversion, conv))

    gqa_mixed = "GQA layer-mixed (51%) @ conversion"
    gqa_one = "GQA 1 KV head (33%) @ conversion"

    def run_gqa(c, which):
        from mixsga import hf

        if which == gqa_mixed:
            model = su.make_arm(c.base, su.GQA, 0, None)
            note, target = "every 4th layer keeps its 3 KV heads, the others mean-pooled to 1 (smollm2_uptrain)", 0.5
        else:
            model = hf.to_gqa(copy.deepcopy(c.base), kv_heads=1)
            note, target = "25 % is not reachable with 3 KV heads: every layer mean-pooled to 1 head (33 %)", 0.25
        model.eval()
        return [evaluate_kind(c, model, dynamic_cache_kind(model, c.base.config), which, target, None,
                              "GQA at conversion", note)]

    for which, target in ((gqa_mixed, 0.5), (gqa_one, 0.25)):
        tasks.append(Task([(which, target, None)], lambda c, w=which: run_gqa(c, w), which))

    steps = uptrain["steps"]
    up_mix = f"mixSGA E1 1:3 (50%) @ uptrained {steps} steps"
    up_gqa = f"GQA layer-mixed (51%) @ uptrained {steps} steps"
    for seed in seeds:
        for arm, method in ((su.ARMS[3], up_mix), (su.GQA, up_gqa)):
            keys = mixsga_keys(method, 0.5, seed) if arm.method == "mixsga" else [(method, 0.5, seed)]

            def run(c, arm=arm, method=method, seed=seed):
                return _smollm2_uptrained(c, arm, method, seed, uptrain)

            tasks.append(Task(keys, run, f"{method}, seed {seed}"))
    return tasks


def _smollm2_uptrained(c: ModelContext, arm, method: str, seed: int, uptrain: dict) -> list[dict]:
    from mixsga import hf
    from mixsga.train.loop import TrainConfig, train
    from mixsga_demo import smollm2_uptrain as su

    st = c.state
    if "uptrain" not in st:
        st["uptrain"] = st["uptrain_data"]()
    data, calib_u, _ = st["uptrain"]
    t0 = time.perf_counter()
    model = su.make_arm(c.base, arm, seed, calib_u)
    tc = TrainConfig(steps=uptrain["steps"], batch_size=uptrain["batch"], lr=uptrain["lr"], seed=100 + seed,
                     precision=uptrain["precision"], lr_multipliers=su._lr_multipliers(arm), progress=False)
    result = train(model, data, tc)
    model.eval()
    details = {"train_seconds": time.perf_counter() - t0, "steps": uptrain["steps"],
               "tokens": uptrain["steps"] * uptrain["batch"] * uptrain["block"],
               "last_train_loss": result.losses[-1] if result.losses else None, "precision": uptrain["precision"]}
    if arm.method != "mixsga":
        return [evaluate_kind(c, model, dynamic_cache_kind(model, c.base.config), method, 0.5, seed, "GQA uptrained",
                              "every 4th layer keeps 3 KV heads, the others mean-pooled to 1; uptrained as "
                              "smollm2_uptrain trains it", details)]
    details["decode_budget_calibration_text"] = hf.calibrate_decode_routing(model, st["calib"])
    return evaluate_mixsga(c, model, method, 0.5, seed, "mixSGA uptrained",
                           "groups (1, 3), ratios (0.25, 0.75), learned key scales calibrated (no router warm "
                           "start), uptrained as smollm2_uptrain trains it; decode routing calibrated", details)


# --- kvpress (separate environment) -----------------------------------------------------------------------

def save_plain_model(model, path: Path) -> None:
    """save_pretrained of the plain float32 Llama, with its config also in the older key names (rope_theta,
    torch_dtype) so that an older transformers reads the same rotary base."""
    path = Path(path)
    model.save_pretrained(path)
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") == "default" and "rope_scaling" not in cfg:
        cfg["rope_scaling"] = None
    cfg.setdefault("torch_dtype", "float32")
    cfg_path.write_text(json.dumps(cfg, indent=2))


#: The runner, beside this module (the other environment runs it; it never imports mixsga).
RUNNER = Path(__file__).resolve().parent / "kvpress_runner.py"


def run_kvpress(ctx: ModelContext, rows_path: Path, env_dir: Path, python: str, runner: Path = RUNNER,
                presses=PRESSES, budgets=TARGETS, timeout: int = 5400) -> None:
    """Calls the kvpress runner (its packages in ``env_dir``, put first on PYTHONPATH) on this model's eval file
    and saved model, then appends its rows to ``rows_path`` (seed None). Records why, as a row note, when it
    cannot run."""
    keys = [(f"kvpress:{p}", float(b), None) for p in presses for b in budgets]
    done = done_keys(rows_path)
    if all((ctx.name, m, round(t, 6), s) in done for m, t, s in keys):
        return
    env_dir, runner = Path(env_dir), Path(runner)
    reason = None
    if not env_dir.is_dir():
        reason = f"not run: {env_dir} does not exist (scripts/kvpress_env.sh creates it)"
    elif not runner.is_file():
        reason = f"not run: {runner} does not exist"
    if reason:
        _log(f"{ctx.name}: kvpress {reason}")
        append_row(rows_path, {"model": ctx.name, "method": "kvpress", "target": 0.0, "seed": None,
                               "family": "kvpress", "nll": None, "note": reason})
        return
    eval_set = ctx.eval_set  # written to ctx.eval_path
    if not (ctx.model_dir / "config.json").is_file():
        save_plain_model(ctx.base, ctx.model_dir)
    out = ctx.out / f"kvpress_{ctx.slug}.jsonl"
    out.unlink(missing_ok=True)
    cmd = [python, str(runner), "--model", str(ctx.model_dir), "--eval", str(ctx.eval_path),
           "--presses", ",".join(presses), "--budgets", ",".join(f"{b:g}" for b in budgets), "--out", str(out),
           "--label", ctx.name]
    env = {**os.environ, "PYTHONPATH": str(env_dir)}
    _log(f"{ctx.name}: kvpress runner: {' '.join(cmd)}")
    t0 = time.perf_counter()
    log_path = ctx.out / f"kvpress_{ctx.slug}.log"
    try:
        with log_path.open("a") as log:
            proc = subprocess.run(cmd, cwd=str(ctx.out), env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    runner_rows = read_rows(out)
    _log(f"{ctx.name}: kvpress runner exit {rc} after {time.perf_counter() - t0:.0f} s, {len(runner_rows)} rows")
    n = eval_set["context"].shape[0]
    for r in runner_rows:
        row = {**r, "model": ctx.name, "runner_model": r.get("model"), "seed": None, "family": "kvpress"}
        row.setdefault("method", "kvpress")
        row.setdefault("target", r.get("kv_fraction", 0.0))
        if row.get("per_sequence_nll") is not None and len(row["per_sequence_nll"]) != n:
            row["note"] = f"{row.get('note', '')}; per-sequence values for {len(row['per_sequence_nll'])} != {n} sequences"
        if "error" in r:
            row["nll"] = None
        if row.get("nll") is not None and row_key(row) in done_keys(rows_path):
            continue
        append_row(rows_path, row)
    if rc != 0 and not runner_rows:
        tail = log_path.read_text()[-2000:] if log_path.is_file() else ""
        append_row(rows_path, {"model": ctx.name, "method": "kvpress", "target": 0.0, "seed": None, "family": "kvpress",
                               "nll": None, "note": f"runner exit {rc}: {tail}"})


# --- The run ----------------------------------------------------------------------------------------------

def build_contexts(out: Path, models, quick: bool, testbed_cache: Path) -> dict[str, tuple]:
    """(ModelContext, tasks) per model name."""
    from mixsga_demo import regime
    from mixsga_demo.study import StudyArm

    contexts = {}
    for key in models:
        name = MODEL_KEYS[key]
        protocol = (QUICK_PROTOCOLS if quick else PROTOCOLS)[name]
        if name == TESTBED:
            if quick:
                cfg = regime.RegimeConfig.quick()
                cache = out / "cache"
                arms = (StudyArm("GQA-50%", "gqa", 0.5, kv_heads=2),
                        StudyArm("mixSGA E1 3:1:6 (50%)", "mixsga", 0.5, groups=(1, 2, 4), ratios=(0.3, 0.1, 0.6),
                                 options=(("key_scale", "learned"),), prepare=True, family="E1"))
                seeds, budget, group, residual = (0,), cfg.budgets[0], 8, 4
                which = QUANTIZED[:2]
            else:
                cfg, cache = regime.RegimeConfig(), Path(testbed_cache)
                names = ("GQA-50%", "GQA-25%", "mixSGA ext 1:7:2 (50%)", "mixSGA ext 1:7:2 (25%)",
                         "mixSGA E1 3:1:6 (50%)", "mixSGA E1 1:3 (25%)")
                arms = tuple(a for a in regime.ARMS if a.name in names)
                seeds, budget, group, residual = cfg.seeds, 0.003, 16, 8
                which = QUANTIZED
            ctx = ModelContext(name, out, protocol, testbed_loader(cfg, cache, protocol), quick)
            runs = Path(testbed_cache).parent / "runs.jsonl"
            tasks = ([full_task()] + quantized_tasks(ctx, group, residual, which)
                     + testbed_tasks(arms, seeds, budget, None if quick else runs))
        else:
            if quick:
                uptrain = {"steps": 1, "batch": 2, "block": 32, "lr": 2e-4, "precision": "bf16"}
                loader = smollm2_loader(protocol, 4, 64, uptrain)
                seeds, residual, which, router_steps = (0,), 4, QUANTIZED[:2], 5
            else:
                uptrain = dict(SMOLLM2_UPTRAIN)
                loader = smollm2_loader(protocol, 32, 128, uptrain)
                seeds, residual, which, router_steps = (0, 1), 16, QUANTIZED, 200
            ctx = ModelContext(name, out, protocol, loader, quick)
            tasks = [full_task()] + quantized_tasks(ctx, 64, residual, which) + smollm2_tasks(seeds, uptrain,
                                                                                                router_steps)
            if quick:
                tasks = [t for t in tasks if "1/3" not in t.label and "33%" not in t.label]
        contexts[key] = (ctx, tasks)
    return contexts


def run(out: Path, models=("testbed", "smollm2"), quick: bool = False, plot_path: Path | None = None,
        testbed_cache: Path = Path("out/regime/cache"), kvpress: bool = True, kvpress_python: str | None = None,
        kvpress_env: Path = Path(".kvpress")) -> list[dict]:
    """Runs every method of every model not yet in <out>/rows.jsonl (in-process methods first, then the kvpress
    runner), writing the report after each; returns the rows."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    kvpress_env = Path(kvpress_env).resolve()
    t_start = time.perf_counter()
    contexts = build_contexts(out, models, quick, testbed_cache)
    for key, (ctx, tasks) in contexts.items():
        done = done_keys(rows_path)
        todo = [t for t in tasks if not all((ctx.name, m, round(float(tg), 6), s) in done for m, tg, s in t.keys)]
        _log(f"{ctx.name}: {len(tasks) - len(todo)} tasks done, {len(todo)} to go")
        for n, task in enumerate(todo, start=1):
            t0 = time.perf_counter()
            try:
                new = task.run(ctx)
            except Exception as exc:  # a failing method is recorded, the others still run
                import traceback

                traceback.print_exc()
                new = [{"model": ctx.name, "method": m, "target": tg, "seed": s, "nll": None,
                        "error": f"{type(exc).__name__}: {exc}"} for m, tg, s in task.keys]
            done = done_keys(rows_path)
            for row in new:
                if row.get("nll") is None or row_key(row) not in done:
                    append_row(rows_path, row)
                if row.get("nll") is not None:
                    _log(f"{ctx.name} [{n}/{len(todo)}] {row['method']} (target {row['target']}, seed {row.get('seed')}): "
                         f"KV {row['kv_fraction']:.4f}, ppl {row['ppl']:.3f}, top-1 {row['top1_agreement']:.3f}, "
                         f"greedy {row['greedy_agreement']:.3f} ({time.perf_counter() - t0:.0f} s)")
                else:
                    _log(f"{ctx.name} [{n}/{len(todo)}] {row['method']}: FAILED {row.get('error')}")
            write_report(out, plot_path)
    if kvpress:
        for key, (ctx, _) in contexts.items():
            presses, budgets = (PRESSES[:1], TARGETS[:1]) if quick else (PRESSES, TARGETS)
            run_kvpress(ctx, rows_path, kvpress_env, kvpress_python or sys.executable, presses=presses,
                        budgets=budgets)
    rows = write_report(out, plot_path)
    _log(f"done in {time.perf_counter() - t_start:.0f} s: {out / 'kv_alternatives.md'}")
    return rows


def write_report(out: Path, plot_path: Path | None = None) -> list[dict]:
    rows = read_rows(out / "rows.jsonl")
    (out / "kv_alternatives.md").write_text(render_markdown(rows))
    summary = [{k: v for k, v in s.items() if k not in ("runs",)} for s in summarise(rows)]
    (out / "kv_alternatives.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"),
                                                          "versions": versions(), "summary": summary}, indent=1))
    if summary:
        plot(rows, plot_path or out / "kv_alternatives.png")
    return rows
