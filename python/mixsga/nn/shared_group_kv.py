"""SharedGroupKV: the weight-shared K/V projections of all experts (METHOD.md step 5)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_group_sizes, check_positive


def pool_kv_weight(weight: torch.Tensor, group_size: int, head_dim: int) -> torch.Tensor:
    """Pools the rows of a K/V projection weight [Hkv*d, ...] (or bias [Hkv*d]) over groups of group_size
    consecutive heads: -> [(Hkv/group_size)*d, ...]. Differentiable (plain PyTorch)."""
    if head_dim < 1 or weight.shape[0] % head_dim != 0:
        raise ValueError(f"head_dim: must be >= 1 and divide weight.size(0) ({weight.shape[0]}), got {head_dim}")
    heads = weight.shape[0] // head_dim
    if group_size < 1 or heads % group_size != 0:
        raise ValueError(f"group_size: must be >= 1 and divide the number of KV heads ({heads}), got {group_size}")
    if group_size == 1:
        return weight
    rest = tuple(weight.shape[1:])
    return weight.reshape(heads // group_size, group_size, head_dim, *rest).mean(1).reshape(-1, *rest)


class SharedGroupKV(nn.Module):
    """The layer's original K/V projections, shared by every expert: expert e uses them pooled over groups
    of group_sizes[e] heads. Same arguments, parameter names and shapes as the C++ mixsga::nn::SharedGroupKV.

    Args:
        hidden_size: D. num_kv_heads: Hkv. head_dim: d.
        group_sizes: group size per expert, strictly increasing, each dividing Hkv. Default (1, 2, 4).
        bias: whether k_proj / v_proj have biases. Default False.

    Submodules: k_proj, v_proj = nn.Linear(D, Hkv * d).
    """

    def __init__(
        self,
        hidden_size: int,
        num_kv_heads: int,
        head_dim: int,
        group_sizes: Sequence[int] = (1, 2, 4),
        bias: bool = False,
    ) -> None:
        super().__init__()
        check_positive(hidden_size, "hidden_size")
        check_positive(num_kv_heads, "num_kv_heads")
        check_positive(head_dim, "head_dim")
        self.hidden_size, self.num_kv_heads, self.head_dim = hidden_size, num_kv_heads, head_dim
        self.group_sizes = check_group_sizes(group_sizes, num_kv_heads)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"group_sizes={self.group_sizes}"
        )

    def forward(self, x: torch.Tensor, expert_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V), each [B, L, Hkv, d]: every token's expert-pooled K/V repeated back to Hkv heads, from
        x [B, L, D] and expert_idx [B, L] integer. Both are views of one [B, L, 2*Hkv, d] tensor (see
        grouped_kv)."""
        return grouped_kv(x, self.k_proj, self.v_proj, expert_idx, self.group_sizes, self.head_dim)

    def expert_weights(self, expert: int, key: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pooled (weight [(Hkv/g_e)*d, D], bias [(Hkv/g_e)*d] or None) of expert `expert` for K (key=True)
        or V: what the compact cache projects with."""
        if not 0 <= expert < len(self.group_sizes):
            raise IndexError(f"expert: must be in [0, {len(self.group_sizes)}), got {expert}")
        name = "k_proj" if key else "v_proj"
        weight, bias = effective_linear(getattr(self, name), name)
        g = self.group_sizes[expert]
        bias = None if bias is None else pool_kv_weight(bias, g, self.head_dim)
        return pool_kv_weight(weight, g, self.head_dim), bias


def grouped_kv(
    x: torch.Tensor,
    k_proj: nn.Module,
    v_proj: nn.Module,
    expert_idx: torch.Tensor,
    group_sizes: Sequence[int],
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token's K and V under its own expert, in one ``grouped_kv_proj`` over the stacked weight
    [W_k; W_v] (2*Hkv heads): the tokens are sorted and gathered once and each expert's GEMM is twice as
    wide, instead of two calls. Pooling groups never straddle the K/V boundary, since every group size
    divides Hkv.

    Args:
        x: [B, L, D]. k_proj, v_proj: nn.Linear(D, Hkv*d) or a PEFT LoRA Linear wrapping one (their
            effective weights are used, see ``effective_linear``).
        expert_idx: [B, L] integer in [0, E). group_sizes: E group sizes. head_dim: d.
    Returns:
        (K, V), each [B, L, Hkv, d], views (split on the head axis) of one [B, L, 2*Hkv, d] tensor.
    """
    weight, bias = stacked_kv_weight(k_proj, v_proj)
    kv = torch.ops.mixsga.grouped_kv_proj(x, weight, bias, expert_idx, list(group_sizes), head_dim)
    heads = weight.shape[0] // (2 * head_dim)
    # split (not two narrows): its backward is one cat of the two gradients, not two zero-filled buffers.
    k, v = kv.split(heads, dim=-2)
    return k, v


# --- The effective projection of the module at k_proj / v_proj ---------------------------------------------
# mixSGA never calls k_proj / v_proj: every expert projects with their pooled weights (step 5), so what a
# module does to its input must be expressible as one weight and bias. For a plain nn.Linear that is its
# parameters. For a PEFT LoRA layer (peft.tuners.lora.Linear, recognised by its attributes so that mixsga
# does not import peft) it is W + sum_a scaling_a * B_a @ A_a over the active, unmerged adapters: reading
# `.weight` there gives the frozen base weight alone, which would leave the adapters without gradient and
# without effect while merge_and_unload() applies them. Everything that reads the K/V weights goes through
# _linear_terms, so there is one definition of "the weight mixSGA projects with".

_LORA_ATTRIBUTES = ("base_layer", "lora_A", "lora_B", "scaling", "active_adapters")
_STACK_CACHE, _POOLED_CACHE = "_mixsga_kv_stack", "_mixsga_kv_pooled"


class _LowRank(NamedTuple):
    """One active, unmerged LoRA adapter: adds scaling * B @ A to the weight and scaling * b_B to the bias."""

    a: torch.Tensor  #: [r, in]
    b: torch.Tensor  #: [out, r]
    b_bias: torch.Tensor | None  #: [out] (PEFT's lora_bias=True) or None
    scaling: float


class _LinearTerms(NamedTuple):
    """A K/V projection module as parts: its base nn.Linear's weight [out, in] and bias [out] or None, the
    low-rank terms on top (none for a plain nn.Linear), the state of each wrapper (part of the inference
    cache's key: a merge edits the base weight through .data, which its version counter does not see), and
    the base nn.Linear itself, where the inference cache lives."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    low_rank: tuple[_LowRank, ...]
    wrappers: tuple
    base: nn.Linear


def effective_linear(module: nn.Module, name: str = "module") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [out, in], bias [out] or None) that ``module`` applies to its input, x -> x W^T + b: what
    mixSGA projects K/V with in place of calling the module.

    - nn.Linear: its own ``weight`` and ``bias``, unchanged (the same tensors).
    - PEFT LoRA Linear (``base_layer``, ``lora_A``, ``lora_B``, ``scaling``, ``active_adapters``): the base
      layer's weight plus ``scaling * B @ A`` of every active adapter (and ``scaling * b_B`` with
      lora_bias), differentiable in A and B; the base layer alone when its adapters are merged (the base
      weight already holds them) or disabled (a merged layer is unmerged first, as its own forward does).

    Raises a ValueError / TypeError naming ``name`` for what has no effective weight: LoRA dropout > 0 in
    training (it acts on the input), DoRA and other LoRA variants, forward hooks on the LoRA layer (PEFT's
    mixed-adapter batches), and any other module type.
    """
    return _combine(_linear_terms(module, name))


def _linear_terms(module: nn.Module, name: str) -> _LinearTerms:
    # The plain nn.Linear first: it is the decode path's per-call cost (a dict lookup, no getattr misses).
    if isinstance(module, nn.Linear) and "base_layer" not in module._modules:
        weight = module.weight
        if weight.dim() != 2 or not weight.is_floating_point():  # e.g. a quantised nn.Linear subclass
            raise TypeError(
                f"{name}: mixSGA projects K/V with the weight of the module at {name}, which must be a floating "
                f"point [out, in] matrix; {_type_name(module)} has a {weight.dtype} weight of shape "
                f"{list(weight.shape)}"
            )
        return _LinearTerms(weight, module.bias, (), (), module)
    if all(hasattr(module, a) for a in _LORA_ATTRIBUTES):
        return _lora_terms(module, name)
    raise TypeError(
        f"{name}: mixSGA projects K/V with the effective weight of the module at {name}, so it must be an "
        f"nn.Linear or a PEFT LoRA Linear wrapping one; got {_type_name(module)}"
    )


def _lora_terms(module: nn.Module, name: str) -> _LinearTerms:
    """The terms of a PEFT LoRA Linear, following what its forward computes (peft.tuners.lora.Linear)."""
    kind = _type_name(module)
    if module._forward_pre_hooks or module._forward_hooks:
        raise ValueError(
            f"{name}: {kind} at {name} has forward hooks (PEFT's mixed-adapter batches, adapter_names=..., "
            f"install them), but mixSGA projects K/V with the module's effective weight and never calls it; "
            f"run one adapter at a time (set_adapter) or leave k_proj/v_proj out of target_modules"
        )
    base = _linear_terms(module.base_layer, name)
    if module.disable_adapters and module.merged:
        module.unmerge()  # what the LoRA layer's own forward does before using its base layer alone
    # Which adapters the base weight holds, and whether they are off: part of the inference cache's key.
    state = ("lora", tuple(module.merged_adapters), bool(module.disable_adapters))
    if module.disable_adapters or module.merged:  # the base layer alone (merged: its weight holds them)
        return base._replace(wrappers=base.wrappers + (state,))
    variants = getattr(module, "lora_variant", {}) or {}
    use_dora = getattr(module, "use_dora", {}) or {}
    terms = []
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:  # an adapter that does not target this layer (PEFT skips it too)
            continue
        if use_dora.get(adapter, False) or adapter in variants:
            variant = "DoRA (use_dora=True)" if use_dora.get(adapter, False) else type(variants[adapter]).__name__
            raise ValueError(
                f"{name}: mixSGA projects K/V with the effective weight of the module at {name}; {kind} with "
                f"adapter {adapter!r} using {variant} has none (it is not W + scaling * B @ A); use plain "
                f"LoRA for k_proj/v_proj or leave them out of target_modules"
            )
        dropout = module.lora_dropout[adapter] if hasattr(module, "lora_dropout") else nn.Identity()
        p = getattr(dropout, "p", None)
        # Dropout with p > 0 while training masks the input of A: no weight reproduces that.
        inactive = isinstance(dropout, nn.Identity) or (
            isinstance(dropout, nn.Dropout) and (p == 0 or not dropout.training)
        )
        if not inactive:
            raise ValueError(
                f"{name}: mixSGA projects K/V with the effective weight of the module at {name}; {kind} with "
                f"lora_dropout={p if p is not None else _type_name(dropout)} in training has none (dropout acts on "
                f"the input, not on the weight); set lora_dropout=0 for k_proj/v_proj, leave them out of "
                f"target_modules, or call eval()"
            )
        lora_a, lora_b, scaling = module.lora_A[adapter], module.lora_B[adapter], module.scaling[adapter]
        numeric = isinstance(scaling, (int, float)) and not isinstance(scaling, bool)
        if not (isinstance(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear) and numeric):
            raise TypeError(
                f"{name}: {kind} at {name}: expected adapter {adapter!r} as nn.Linear lora_A/lora_B and a number "
                f"scaling, got {_type_name(lora_a)}, {_type_name(lora_b)} and {scaling!r}"
            )
        terms.append(_LowRank(lora_a.weight, lora_b.weight, lora_b.bias, float(scaling)))
    return base._replace(low_rank=base.low_rank + tuple(terms), wrappers=base.wrappers + (state,))


def _type_name(module: object) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _combine(terms: _LinearTerms) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of the terms. No low-rank term: the base tensors themselves. The delta is formed as
    PEFT's merge forms it, (B @ A) * scaling, so a merged model's weight is the same number."""
    weight, bias = terms.weight, terms.bias
    for term in terms.low_rank:
        weight = weight + ((term.b @ term.a) * term.scaling).to(weight.dtype)
        if term.b_bias is not None:
            delta = (term.b_bias * term.scaling).to(weight.dtype)
            bias = delta if bias is None else bias + delta
    return weight, bias


def _tensor_key(t: torch.Tensor | None):
    # requires_grad too: PEFT freezes the base weights when it wraps a layer and merges into them through
    # .data (invisible to the version counter), so an entry made before wrapping must not survive unloading.
    return None if t is None else (t.data_ptr(), t._version, t.dtype, t.device, t.requires_grad)


def _terms_key(terms: _LinearTerms) -> tuple:
    base = (_tensor_key(terms.weight), _tensor_key(terms.bias))
    if not terms.wrappers:  # a plain nn.Linear (the decode path): nothing else to compare
        return base
    low_rank = tuple((_tensor_key(t.a), _tensor_key(t.b), _tensor_key(t.b_bias), t.scaling) for t in terms.low_rank)
    return base + (low_rank, terms.wrappers)


def _stack(k: _LinearTerms, v: _LinearTerms) -> tuple[torch.Tensor, torch.Tensor | None]:
    (wk, bk), (wv, bv) = _combine(k), _combine(v)
    if bk is None and bv is None:
        return torch.cat((wk, wv)), None
    # One side without bias (e.g. LoRA's lora_bias on k_proj only): its bias is zero.
    bk = wk.new_zeros(wk.shape[0]) if bk is None else bk
    bv = wv.new_zeros(wv.shape[0]) if bv is None else bv
    return torch.cat((wk, wv)), torch.cat((bk, bv))


def _kv_stack(k_proj: nn.Module, v_proj: nn.Module):
    """(cache key or None, ([W_k; W_v], [b_k; b_v] or None), the dict the caches live in: v_proj's base
    nn.Linear's __dict__). The key is None with autograd on or while compiling (nothing is cached)."""
    k, v = _linear_terms(k_proj, "k_proj"), _linear_terms(v_proj, "v_proj")
    home = v.base.__dict__  # the same object before, while and after PEFT wraps v_proj
    compiling = torch.compiler.is_compiling()
    if compiling or torch.is_grad_enabled():
        if (k.wrappers or v.wrappers) and not compiling:
            # Adapters being trained will be merged into the base weights through .data; an entry from
            # before must not be found again after merge_and_unload().
            home.pop(_STACK_CACHE, None)
            home.pop(_POOLED_CACHE, None)
        return None, _stack(k, v), home
    key = (_terms_key(k), _terms_key(v))
    cached = home.get(_STACK_CACHE)
    if cached is None or cached[0] != key:
        cached = (key, _stack(k, v))
        home[_STACK_CACHE] = cached
    return key, cached[1], home


def stacked_kv_weight(k_proj: nn.Module, v_proj: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([W_k; W_v] [2*Hkv*d, D], [b_k; b_v] or None), from the modules' effective weights
    (``effective_linear``: an nn.Linear's own, or a PEFT LoRA layer's W + scaling * B @ A).

    With autograd on (training) or under torch.compile this is a fresh torch.cat, differentiable. Without
    autograd (inference, decode) the concatenation is kept on v_proj's base nn.Linear and reused while every
    tensor it was formed from is unchanged (same storage, same version counter; LoRA's A and B and the
    adapters' state included): a decode step would otherwise copy both weights for one token. In-place
    updates through ``.data`` bypass the version counter; call ``clear_kv_weight_cache(v_proj)`` after such
    an edit.
    """
    return _kv_stack(k_proj, v_proj)[1]


def clear_kv_weight_cache(v_proj: nn.Module) -> None:
    """Drops the stacked and pooled K/V weights kept for inference on ``v_proj`` (needed only after an
    in-place edit through ``.data``, which the version counter does not see). ``v_proj`` may be a PEFT
    wrapper: the caches of every module down to its base nn.Linear are dropped."""
    module = v_proj
    while module is not None:
        module.__dict__.pop(_STACK_CACHE, None)
        module.__dict__.pop(_POOLED_CACHE, None)
        module = module._modules.get("base_layer") if isinstance(module, nn.Module) else None


class CompactKV(NamedTuple):
    """The K/V of the valid tokens at their compact size (``compact_kv``), one entry per expert."""

    keys: list[torch.Tensor]  #: E tensors [N_e, Hkv/g_e, d]
    values: list[torch.Tensor]  #: E tensors [N_e, Hkv/g_e, d]
    rows: list[torch.Tensor]  #: E int64 tensors [N_e]: flat token index b * L + t, batch-major


def compact_kv(
    x: torch.Tensor,
    k_proj: nn.Module,
    v_proj: nn.Module,
    expert_idx: torch.Tensor,
    valid: torch.Tensor | None,
    group_sizes: Sequence[int],
    head_dim: int,
) -> CompactKV:
    """Each valid token's K and V at its expert's compact size, never expanded to Hkv heads: what the
    compact cache stores (``HeteroKVCache.append_compact``), for decode steps and chunks. Expert e projects
    its tokens with its pooled [W_k; W_v] (kept between calls without autograd, like stacked_kv_weight), so
    it reads 1/g_e of the weights. The same as the C++ ``SharedGroupKV::forward_compact``.

    Args:
        x: [B, L, D]. expert_idx: [B, L] integer in [0, E). valid: optional [B, L] bool (padding is skipped).
    Returns:
        CompactKV(keys, values, rows): expert e's tokens in batch-major order, the order append_compact expects.
    """
    E, D = len(group_sizes), x.shape[-1]
    pooled = _pooled_kv_weights(k_proj, v_proj, group_sizes, head_dim)
    heads = pooled[0][0].shape[0] * group_sizes[0] // (2 * head_dim)  # expert 0 keeps Hkv/g_0 of 2*Hkv heads
    idx = expert_idx.reshape(-1).long()
    flat = x.reshape(-1, D)
    if idx.numel() == 1:
        # One decode token: its expert is read directly (a host read, as the permutation's offsets would
        # be), which saves the permutation op on the latency-bound path. Padding: bucket E, no expert.
        expert = int(idx[0]) if valid is None or bool(valid.reshape(-1)[0]) else E
        perm = torch.zeros(1, dtype=torch.long, device=x.device)
        bounds = [0] * (expert + 1) + [1] * (E - expert)
    else:
        if valid is not None:  # padding goes to an extra bucket E that is never projected
            idx = idx.masked_fill(~valid.reshape(-1), E)
        perm, offsets = torch.ops.mixsga.expert_permutation(idx, E + 1)
        bounds = offsets.tolist()
    out = CompactKV([], [], [])
    for e, g in enumerate(group_sizes):
        rows = perm[bounds[e] : bounds[e + 1]]
        if rows.numel() == 0:  # no projection for an expert without tokens
            k = v = flat.new_empty(0, heads // g, head_dim)
        else:
            weight, bias = pooled[e]
            kv = F.linear(flat.index_select(0, rows), weight, bias).view(-1, 2 * heads // g, head_dim)
            k, v = kv.split(heads // g, 1)
        out.keys.append(k)
        out.values.append(v)
        out.rows.append(rows)
    return out


def _pooled_kv_weights(
    k_proj: nn.Module, v_proj: nn.Module, group_sizes: Sequence[int], head_dim: int
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """[(pooled [W_k; W_v], pooled [b_k; b_v] or None) per expert], cached next to stacked_kv_weight's
    entry under its key plus the group sizes; fresh (differentiable) with autograd on."""
    key, (weight, bias), home = _kv_stack(k_proj, v_proj)
    if key is None:
        return [(pool_kv_weight(weight, g, head_dim), None if bias is None else pool_kv_weight(bias, g, head_dim))
                for g in group_sizes]
    key = (key, tuple(group_sizes), head_dim)
    cached = home.get(_POOLED_CACHE)
    if cached is None or cached[0] != key:
        pooled = [(pool_kv_weight(weight, g, head_dim).contiguous(),
                   None if bias is None else pool_kv_weight(bias, g, head_dim).contiguous()) for g in group_sizes]
        cached = (key, pooled)
        home[_POOLED_CACHE] = cached
    return cached[1]


def pooling_error(
    x: torch.Tensor, k_proj: nn.Module, v_proj: nn.Module, group_size: int, head_dim: int
) -> torch.Tensor:
    """Each token's importance for routing (``routing_signal="pooling_error"``): how much mean-pooling
    groups of ``group_size`` KV heads destroys its K and V, ``||KV_t - pool_g(KV_t)||^2`` summed over its
    2*Hkv heads (K and V from the full projections, before RoPE, which is an isometry per head and so
    leaves the error unchanged). No gradient. x [B, L, D] -> [B, L] float32 (float64 for float64 x)."""
    with torch.no_grad():
        weight, bias = stacked_kv_weight(k_proj, v_proj)
        kv = F.linear(x.detach(), weight, bias)
        B, L = x.shape[0], x.shape[1]
        kv = kv.view(B, L, -1, group_size, head_dim)  # groups never straddle K and V (g divides Hkv)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        kv = kv.to(acc)
        return (kv - kv.mean(3, keepdim=True)).square().sum((2, 3, 4))
