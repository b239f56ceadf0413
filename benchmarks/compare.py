"""Side-by-side timings (CPU, or CUDA with --device cuda) of a mixSGA layer against what a user would otherwise run.

Arms (same shape, same weights where they share them):
  mixsga     mixsga.nn.MixSGAAttention, 3:1:6 over (1, 2, 4) (50 % KV budget)
  naive      the same layer written the way the paper describes its naive implementation: full K/V
             projection, pooling via reshape/mean/repeat_interleave for every expert, a Python loop
             over sequences and experts for routing, gather by expert, expanded K/V
  gqa50      static GQA at the same budget (Hkv/2 mean-pooled heads), SDPA with enable_gqa
  base       the base layer (all Hkv heads), SDPA with enable_gqa

Usage: python benchmarks/compare.py [--quick] [--device cpu|cuda] [--out out/bench/compare.md]
Writes a markdown table of times and ratios (mixsga / arm), measured side by side in one run with
torch.utils.benchmark (blocked_autorange).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import mixsga

GROUPS = (1, 2, 4)
RATIOS = (0.3, 0.1, 0.6)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """HF Llama RoPE on [B, L, H, d]."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=positions.device) / d)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().to(x.dtype)[None, :, None, :], emb.sin().to(x.dtype)[None, :, None, :]
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


class NaiveMixSGA(torch.nn.Module):
    """The paper's 'naive implementation', shares its weights with a mixsga.nn.MixSGAAttention."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads = layer.num_heads, layer.num_kv_heads
        self.d = layer.head_dim

    def route(self, scores: torch.Tensor) -> torch.Tensor:
        B, L, E = scores.shape
        # Built on the scores' device: a CPU mask cannot index CUDA scores (and vice versa).
        idx = torch.full((B, L), E - 1, dtype=torch.long, device=scores.device)
        for b in range(B):
            free = torch.ones(L, dtype=torch.bool, device=scores.device)
            for e in range(E - 1):
                k = min(math.ceil(RATIOS[e] * L - 1e-6), int(free.sum()))
                if k == 0:
                    continue
                masked = scores[b, :, e].masked_fill(~free, float("-inf"))
                top = masked.topk(k).indices
                idx[b, top] = e
                free[top] = False
        return idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        lay, Hkv, d = self.layer, self.kv_heads, self.d
        scores = torch.sigmoid(lay.router.proj(x))
        idx = self.route(scores.detach())
        k_full = lay.k_proj(x).view(B, L, Hkv, d)
        v_full = lay.v_proj(x).view(B, L, Hkv, d)
        k_all, v_all = [], []
        for g in GROUPS:  # every expert's pooled K/V for every token, then pick
            k_all.append(k_full.view(B, L, Hkv // g, g, d).mean(3).repeat_interleave(g, 2))
            v_all.append(v_full.view(B, L, Hkv // g, g, d).mean(3).repeat_interleave(g, 2))
        pick = idx[:, :, None, None, None].expand(B, L, 1, Hkv, d)
        k = torch.stack(k_all, 2).gather(2, pick).squeeze(2)
        v = torch.stack(v_all, 2).gather(2, pick).squeeze(2)
        pos = torch.arange(L, device=x.device)
        q = rope(lay.q_proj(x).view(B, L, self.heads, d), pos).transpose(1, 2)
        k = rope(k, pos).transpose(1, 2).repeat_interleave(self.heads // Hkv, 1)
        v = v.transpose(1, 2).repeat_interleave(self.heads // Hkv, 1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return lay.o_proj(out.transpose(1, 2).reshape(B, L, self.heads * d))


class StaticGQA(torch.nn.Module):
    """Plain GQA layer with `kv_heads` heads (mean-pooled from the base layer's when pooled)."""

    def __init__(self, layer: torch.nn.Module, group: int):
        super().__init__()
        self.heads, self.kv_heads, self.d = layer.num_heads, layer.num_kv_heads // group, layer.head_dim
        D = layer.q_proj.in_features
        self.q_proj, self.o_proj = layer.q_proj, layer.o_proj
        w = layer.q_proj.weight
        self.k_proj = torch.nn.Linear(D, self.kv_heads * self.d, bias=False, dtype=w.dtype, device=w.device)
        self.v_proj = torch.nn.Linear(D, self.kv_heads * self.d, bias=False, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            for src, dst in ((layer.k_proj, self.k_proj), (layer.v_proj, self.v_proj)):
                dst.weight.copy_(src.weight.view(self.kv_heads, group, self.d, D).mean(1).reshape(-1, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        pos = torch.arange(L, device=x.device)
        q = rope(self.q_proj(x).view(B, L, self.heads, self.d), pos).transpose(1, 2)
        k = rope(self.k_proj(x).view(B, L, self.kv_heads, self.d), pos).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.kv_heads, self.d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, self.heads * self.d))


class NaiveDecode:
    """One decode step of the naive implementation: argmax routing, the full K/V projection of the new
    token, every expert's pooled K/V via reshape/mean/repeat_interleave, pick, RoPE, and an expanded
    (full-size, Hkv heads per token) preallocated K/V cache, attended with SDPA."""

    def __init__(self, layer: torch.nn.Module, batch: int, context: int):
        self.layer, self.t = layer, context
        Hkv, d = layer.num_kv_heads, layer.head_dim
        dtype, device = layer.q_proj.weight.dtype, layer.q_proj.weight.device
        self.k = torch.randn(batch, Hkv, context + 1, d, dtype=dtype, device=device)
        self.v = torch.randn(batch, Hkv, context + 1, d, dtype=dtype, device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x [B, 1, D]
        lay, B, t = self.layer, x.shape[0], self.t
        Hq, Hkv, d = lay.num_heads, lay.num_kv_heads, lay.head_dim
        idx = torch.sigmoid(lay.router.proj(x)).argmax(-1)  # [B, 1]
        k_full, v_full = lay.k_proj(x).view(B, 1, Hkv, d), lay.v_proj(x).view(B, 1, Hkv, d)
        k_all = [k_full.view(B, 1, Hkv // g, g, d).mean(3).repeat_interleave(g, 2) for g in GROUPS]
        v_all = [v_full.view(B, 1, Hkv // g, g, d).mean(3).repeat_interleave(g, 2) for g in GROUPS]
        pick = idx[:, :, None, None, None].expand(B, 1, 1, Hkv, d)
        k = torch.stack(k_all, 2).gather(2, pick).squeeze(2)
        v = torch.stack(v_all, 2).gather(2, pick).squeeze(2)
        pos = torch.tensor([t], device=x.device)
        self.k[:, :, t] = rope(k, pos)[:, 0]
        self.v[:, :, t] = v[:, 0]
        q = rope(lay.q_proj(x).view(B, 1, Hq, d), pos).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, self.k, self.v, enable_gqa=True)
        return lay.o_proj(out.transpose(1, 2).reshape(B, 1, Hq * d))


class StaticDecode:
    """One decode step of a static GQA layer (StaticGQA's weights) over a preallocated K/V cache."""

    def __init__(self, gqa: "StaticGQA", batch: int, context: int):
        self.gqa, self.t = gqa, context
        dtype, device = gqa.q_proj.weight.dtype, gqa.q_proj.weight.device
        self.k = torch.randn(batch, gqa.kv_heads, context + 1, gqa.d, dtype=dtype, device=device)
        self.v = torch.randn(batch, gqa.kv_heads, context + 1, gqa.d, dtype=dtype, device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m, B, t = self.gqa, x.shape[0], self.t
        pos = torch.tensor([t], device=x.device)
        self.k[:, :, t] = rope(m.k_proj(x).view(B, 1, m.kv_heads, m.d), pos)[:, 0]
        self.v[:, :, t] = m.v_proj(x).view(B, 1, m.kv_heads, m.d)[:, 0]
        q = rope(m.q_proj(x).view(B, 1, m.heads, m.d), pos).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, self.k, self.v, enable_gqa=True)
        return m.o_proj(out.transpose(1, 2).reshape(B, 1, m.heads * m.d))


def decode_rows(shapes, dtypes, min_time: float, device: torch.device = torch.device("cpu")
                ) -> list[tuple[str, dict[str, float], dict[str, float]]]:
    """One decode step of each arm after a prompt of `context` tokens: (name, times, cache bytes/token)."""
    rows = []
    for hidden, heads, kv_heads, context, batch in shapes:
        for dtype in dtypes:
            torch.manual_seed(0)
            layer = mixsga.nn.MixSGAAttention(hidden, heads, kv_heads, group_sizes=GROUPS, ratios=RATIOS).to(device, dtype)
            layer.eval()
            cache = mixsga._C.HeteroKVCache(layer.cache_options(1))
            with torch.no_grad():
                layer(torch.randn(batch, context, hidden, dtype=dtype, device=device), cache=cache, layer_idx=0)  # prefill
            x = torch.randn(batch, 1, hidden, dtype=dtype, device=device)

            def mixsga_step():
                layer(x, cache=cache, layer_idx=0)
                cache.crop(context)  # back to the prompt, so every timed step sees the same context

            gqa50, base = StaticGQA(layer, 2), StaticGQA(layer, 1)
            arms = {"mixsga": mixsga_step, "naive": NaiveDecode(layer, batch, context),
                    "gqa50": StaticDecode(gqa50, batch, context), "base": StaticDecode(base, batch, context)}
            elem = torch.empty((), dtype=dtype).element_size()
            per_token = {"mixsga": cache.bytes_per_token(), "naive": 2 * kv_heads * layer.head_dim * elem,
                         "gqa50": kv_heads * layer.head_dim * elem, "base": 2 * kv_heads * layer.head_dim * elem}
            times = {}
            with torch.no_grad():
                for arm, fn in arms.items():
                    run = fn if arm == "mixsga" else (lambda fn=fn: fn(x))
                    times[arm] = time_it(run, "decode", arm, min_time).median
            name = f"D={hidden} H={heads} Hkv={kv_heads} T={context} B={batch} {str(dtype).removeprefix('torch.')}"
            print(f"{name:45s} decode step       " + "  ".join(f"{a}={t * 1e3:8.3f} ms" for a, t in times.items()),
                  flush=True)
            rows.append((name, times, per_token))
    return rows


def time_it(fn, label: str, sub_label: str, min_run_time: float) -> benchmark.Measurement:
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, label=label, sub_label=sub_label,
                            num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small shape, short timing (a smoke run)")
    parser.add_argument("--out", default="out/bench/compare.md", help="markdown table to write")
    parser.add_argument("--device", default="cpu", help="device of every arm: cpu (default) or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)

    # (hidden, heads, kv_heads, seq, batch)
    shapes = [(256, 4, 4, 128, 1)] if args.quick else [(512, 8, 4, 1024, 4), (1024, 16, 8, 512, 1),
                                                       (1024, 16, 8, 2048, 1), (2048, 32, 8, 1024, 1),
                                                       (1024, 16, 4, 256, 8), (512, 8, 4, 4096, 1)]
    # (hidden, heads, kv_heads, context, batch) of the decode comparison
    decode_shapes = [(256, 4, 4, 256, 2)] if args.quick else [(1024, 16, 8, 2048, 1), (1024, 16, 8, 2048, 8),
                                                              (1024, 16, 8, 8192, 1), (2048, 32, 8, 8192, 4)]
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    min_time = 0.05 if args.quick else 1.0
    rows = []
    torch.manual_seed(0)
    for hidden, heads, kv_heads, seq, batch in shapes:
        for dtype in dtypes:
            layer = mixsga.nn.MixSGAAttention(hidden, heads, kv_heads, group_sizes=GROUPS, ratios=RATIOS).to(device, dtype)
            arms = {"mixsga": lambda x: layer(x)[0], "naive": NaiveMixSGA(layer),
                    "gqa50": StaticGQA(layer, 2), "base": StaticGQA(layer, 1)}
            x = torch.randn(batch, seq, hidden, dtype=dtype, device=device)
            name = f"D={hidden} H={heads} Hkv={kv_heads} L={seq} B={batch} {str(dtype).removeprefix('torch.')}"
            for mode in ("forward", "forward+backward"):
                times = {}
                for arm, fn in arms.items():
                    if mode == "forward":
                        def run(fn=fn):
                            with torch.no_grad():
                                fn(x)
                    else:
                        xg = x.clone().requires_grad_(True)

                        def run(fn=fn, xg=xg):
                            fn(xg).float().square().mean().backward()
                    times[arm] = time_it(run, mode, arm, min_time).median
                rows.append((name, mode, times))
                print(f"{name:45s} {mode:17s} " + "  ".join(f"{a}={t * 1e3:8.2f} ms" for a, t in times.items()),
                      flush=True)

    lines = [
        # naive/gqa50 bounds what any mixSGA layer can gain on the naive one at this budget: static GQA
        # does the same attention with no routing at all.
        "| shape | pass | mixsga ms | naive ms | gqa50 ms | base ms | mixsga/naive | mixsga/gqa50 | mixsga/base "
        "| naive/gqa50 (bound) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, mode, t in rows:
        lines.append(f"| {name} | {mode} | {t['mixsga'] * 1e3:.2f} | {t['naive'] * 1e3:.2f} | {t['gqa50'] * 1e3:.2f} | "
                     f"{t['base'] * 1e3:.2f} | {t['mixsga'] / t['naive']:.2f} | {t['mixsga'] / t['gqa50']:.2f} | "
                     f"{t['mixsga'] / t['base']:.2f} | {t['naive'] / t['gqa50']:.2f} |")
    decode = decode_rows(decode_shapes, dtypes, min_time, device)
    lines += [
        "",
        "Decode step (one token through the layer after a prompt of T tokens; bytes/token = K/V cache per token):",
        "",
        "| shape | mixsga ms | naive ms | gqa50 ms | base ms | mixsga/naive | mixsga/gqa50 | mixsga/base "
        "| bytes/token mixsga | naive | gqa50 | base |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t, b in decode:
        lines.append(f"| {name} | {t['mixsga'] * 1e3:.3f} | {t['naive'] * 1e3:.3f} | {t['gqa50'] * 1e3:.3f} | "
                     f"{t['base'] * 1e3:.3f} | {t['mixsga'] / t['naive']:.2f} | {t['mixsga'] / t['gqa50']:.2f} | "
                     f"{t['mixsga'] / t['base']:.2f} | {b['mixsga']:.0f} | {b['naive']:.0f} | {b['gqa50']:.0f} | "
                     f"{b['base']:.0f} |")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} with {os.cpu_count()} cores"
    header = (f"Measured {datetime.date.today()} on {where}, "
              f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
              f"command `python benchmarks/compare.py{' --quick' if args.quick else ''}"
              f"{f' --device {args.device}' if device.type != 'cpu' else ''}`.\n\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(header + "\n".join(lines) + "\n")
    print(f"table written to {args.out}")


if __name__ == "__main__":
    main()
