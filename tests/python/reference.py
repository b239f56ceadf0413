"""Slow, obviously-correct pure-PyTorch references, written from docs/METHOD.md alone (no
mixsga code is imported here), so the tests compare two independent implementations."""

from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F


def capacity(ratio: float, n: int) -> int:
    """ceil(ratio * n) with the ratio read as the decimal the user wrote (0.3 * 10 = 3, not 4)."""
    return math.ceil(Fraction(str(ratio)) * n)


def route_expert_choice(scores: torch.Tensor, ratios, valid: torch.Tensor | None = None) -> torch.Tensor:
    """METHOD.md step 2, one sequence at a time, with Python lists."""
    B, L, E = scores.shape
    out = torch.full((B, L), E - 1, dtype=torch.long)
    for b in range(B):
        real = [t for t in range(L) if valid is None or bool(valid[b, t])]
        n, free = len(real), list(real)
        for e in range(E - 1):
            column = scores[b, :, e].double().tolist()
            # Best first: numbers before NaN, higher score first, lower position on ties.
            free.sort(key=lambda t: (math.isnan(column[t]), -column[t] if not math.isnan(column[t]) else 0.0, t))
            k = min(capacity(ratios[e], n), len(free))
            for t in free[:k]:
                out[b, t] = e
            free = free[k:]
    return out


def grouped_kv_pool(kv: torch.Tensor, expert_idx: torch.Tensor, group_sizes) -> torch.Tensor:
    """METHOD.md step 5: every token's heads averaged within its expert's groups, repeated back."""
    *lead, H, d = kv.shape
    out = torch.empty_like(kv)
    for e, g in enumerate(group_sizes):
        pooled = kv.reshape(*lead, H // g, g, d).mean(-2, keepdim=True).expand(*lead, H // g, g, d)
        pooled = pooled.reshape(*lead, H, d)
        mine = (expert_idx == e).unsqueeze(-1).unsqueeze(-1)
        out = torch.where(mine, pooled, out)
    return out


def grouped_kv_proj(x, weight, bias, expert_idx, group_sizes, head_dim):
    """Project with the full weight, then pool (the definition; mixsga pools the weights instead)."""
    y = F.linear(x, weight, bias)
    return grouped_kv_pool(y.reshape(*x.shape[:-1], -1, head_dim), expert_idx, group_sizes)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Hugging Face Llama RoPE written as explicit pair rotations (i, i + d/2), in float64."""
    B, L, H, d = x.shape
    half = d // 2
    pos = positions.reshape(-1, L).double()  # [B|1, L]
    inv_freq = torch.tensor([theta ** (-2.0 * i / d) for i in range(half)], dtype=torch.float64)
    angle = pos.unsqueeze(-1) * inv_freq  # [B|1, L, half]
    cos, sin = angle.cos().unsqueeze(2), angle.sin().unsqueeze(2)
    xd = x.double()
    a, b = xd[..., :half], xd[..., half:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1).to(x.dtype)


def causal_padding_mask(valid: torch.Tensor | None, B: int, L: int) -> torch.Tensor:
    """[B, L, L] bool: query t may see key s when s <= t and (s is a real token or s == t)."""
    t = torch.arange(L)
    causal = t.view(L, 1) >= t.view(1, L)
    if valid is None:
        return causal.expand(B, L, L)
    return causal & (valid.bool().view(B, 1, L) | torch.eye(L, dtype=torch.bool))


def attention(q, k, v, allowed):
    """softmax(q k^T / sqrt(d) + mask) v with explicit per-head loops over [B, L, H, d] inputs whose
    K/V already have as many heads as q."""
    d = q.shape[-1]
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)
    scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)


def mixsga_attention(params: dict, x, expert_idx, *, num_heads, num_kv_heads, head_dim, group_sizes,
                     valid=None, positions=None, theta=10000.0, key_scales=None):
    """The whole layer (METHOD.md steps 5-6) from a state dict: per-token pooled K/V, RoPE, GQA expansion,
    causal softmax attention, output projection. key_scales [E] (extension E1): each token's pooled key is
    multiplied by its expert's factor."""
    B, L, _ = x.shape
    Hq, Hkv, d = num_heads, num_kv_heads, head_dim
    if positions is None:
        positions = torch.arange(L) if valid is None else (valid.long().cumsum(1) - 1).clamp_min(0)
    q = F.linear(x, params["q_proj.weight"], params.get("q_proj.bias")).reshape(B, L, Hq, d)
    k = grouped_kv_proj(x, params["k_proj.weight"], params.get("k_proj.bias"), expert_idx, group_sizes, d)
    v = grouped_kv_proj(x, params["v_proj.weight"], params.get("v_proj.bias"), expert_idx, group_sizes, d)
    if key_scales is not None:
        k = k * key_scales[expert_idx][:, :, None, None]
    q, k = rope(q, positions, theta), rope(k, positions, theta)
    rep = Hq // Hkv
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    out = attention(q, k, v, causal_padding_mask(valid, B, L))
    return F.linear(out.reshape(B, L, Hq * d), params["o_proj.weight"], params.get("o_proj.bias"))


def gqa_attention(params: dict, x, *, num_heads, num_kv_heads, head_dim, group, valid=None, theta=10000.0):
    """Plain GQA whose KV heads are built by mean-pooling groups of `group` consecutive KV heads of the
    weights (Ainslie et al. 2023): the reference for ratios that send every token to one expert."""
    B, L, _ = x.shape
    Hq, Hkv, d = num_heads, num_kv_heads, head_dim
    positions = torch.arange(L) if valid is None else (valid.long().cumsum(1) - 1).clamp_min(0)

    def pooled(name):
        w = params[f"{name}.weight"].reshape(Hkv // group, group, d, -1).mean(1).reshape(Hkv // group * d, -1)
        b = params.get(f"{name}.bias")
        return w, None if b is None else b.reshape(Hkv // group, group, d).mean(1).reshape(-1)

    q = F.linear(x, params["q_proj.weight"], params.get("q_proj.bias")).reshape(B, L, Hq, d)
    k = F.linear(x, *pooled("k_proj")).reshape(B, L, Hkv // group, d)
    v = F.linear(x, *pooled("v_proj")).reshape(B, L, Hkv // group, d)
    q, k = rope(q, positions, theta), rope(k, positions, theta)
    rep = Hq // (Hkv // group)
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    out = attention(q, k, v, causal_padding_mask(valid, B, L))
    return F.linear(out.reshape(B, L, Hq * d), params["o_proj.weight"], params.get("o_proj.bias"))


def aux_loss(logits, target, kind, valid=None):
    """METHOD.md step 4, per token with explicit formulas, mean over valid tokens."""
    E = logits.shape[-1]
    z = logits.double().reshape(-1, E)
    t = target.reshape(-1)
    if kind == "sigmoid_ce":
        s = torch.sigmoid(z)
        per = -(s.gather(1, t.view(-1, 1)).squeeze(1) - s.logsumexp(-1))
    elif kind == "logit_ce":
        per = -(z.gather(1, t.view(-1, 1)).squeeze(1) - z.logsumexp(-1))
    else:
        s = torch.sigmoid(z)
        onehot = F.one_hot(t, E).double()
        per = -(onehot * s.log() + (1 - onehot) * (1 - s).log()).mean(-1)
    w = torch.ones_like(per) if valid is None else valid.reshape(-1).double()
    return (per * w).sum() / w.sum()


def hetero_decode_attention(q, k_pools, v_pools, lengths, num_kv_heads, scale=None):
    """One query per sequence over every cached token of every pool, with the pools expanded back to
    Hkv heads and then to Hq heads (what the compact kernel must equal), in float64."""
    B, Hq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(B, Hq, d, dtype=torch.float64)
    for b in range(B):
        keys, values = [], []
        for e, (kp, vp) in enumerate(zip(k_pools, v_pools)):
            n = int(lengths[b, e])
            g = num_kv_heads // kp.shape[1]
            keys.append(kp[b, :, :n].double().repeat_interleave(g, 0))  # [Hkv, n, d]
            values.append(vp[b, :, :n].double().repeat_interleave(g, 0))
        K, V = torch.cat(keys, 1), torch.cat(values, 1)
        if K.shape[1] == 0:
            continue
        rep = Hq // num_kv_heads
        K, V = K.repeat_interleave(rep, 0), V.repeat_interleave(rep, 0)
        p = (torch.einsum("hd,hnd->hn", q[b].double(), K) * scale).softmax(-1)
        out[b] = torch.einsum("hn,hnd->hd", p, V)
    return out


def pooling_error(x, k_weight, k_bias, v_weight, v_bias, group, head_dim):
    """Per token sum over K and V heads of ||head - mean of its group||^2, head by head (float64)."""
    B, L, _ = x.shape
    err = torch.zeros(B, L, dtype=torch.float64)
    for w, b in ((k_weight, k_bias), (v_weight, v_bias)):
        heads = F.linear(x.double(), w.double(), None if b is None else b.double()).reshape(B, L, -1, head_dim)
        for j in range(heads.shape[2] // group):
            grp = heads[:, :, j * group : (j + 1) * group]
            mean = grp.mean(2, keepdim=True)
            for h in range(group):
                err += (grp[:, :, h] - mean[:, :, 0]).pow(2).sum(-1)
    return err
