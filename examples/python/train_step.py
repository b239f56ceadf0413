"""Training a small decoder LM whose attention layers are mixsga.nn.MixSGAAttention.

Each step: next-token cross-entropy + the layers' averaged aux loss (METHOD.md step 4: it is the only
signal that trains the routers), AdamW, and a report of the loss and of the realised routing ratios:
expert choice (used while training and for the prompt; it meets the capacity ratios exactly) and the
per-token argmax that decoding will use (it matches the ratios only as far as the aux loss taught it).

    PYTHONPATH=build/python .venv/bin/python examples/python/train_step.py --steps 100
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import mixsga
from mixsga.nn import MixSGAAttention


class DecoderBlock(nn.Module):
    """Pre-norm Llama-style block: RMSNorm -> MixSGAAttention -> residual, RMSNorm -> SwiGLU -> residual."""

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, ratios) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model)
        self.attn = MixSGAAttention(d_model, num_heads, num_kv_heads, group_sizes=(1, 2, 4), ratios=ratios)
        self.mlp_norm = nn.RMSNorm(d_model)
        self.gate_up = nn.Linear(d_model, 4 * d_model, bias=False)
        self.down = nn.Linear(2 * d_model, d_model, bias=False)

    def forward(self, x, mask):
        """-> (block output, the attention input, which the routing report re-routes)."""
        h = self.attn_norm(x)
        out, aux = self.attn(h, mask)
        x = x + out
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, -1)
        return x + self.down(F.silu(gate) * up), aux, h.detach()


class TinyDecoder(nn.Module):
    def __init__(self, vocab: int, d_model: int, layers: int, num_heads: int, num_kv_heads: int, ratios) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(DecoderBlock(d_model, num_heads, num_kv_heads, ratios) for _ in range(layers))
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, ids, mask):
        """-> (logits [B, L, V], aux loss averaged over layers, each layer's attention input)."""
        x, aux, inputs = self.embed(ids), [], []
        for block in self.blocks:
            x, a, h = block(x, mask)
            aux.append(a)
            inputs.append(h)
        # Each layer returns aux_alpha * L_aux(l); the mean is the (alpha / N_layers) * sum_l of METHOD.md.
        return self.head(self.norm(x)), torch.stack(aux).mean(), inputs


def make_batch(batch: int, length: int, vocab: int, generator: torch.Generator):
    """Sequences that repeat a random motif (learnable by attention), with random left padding."""
    motif_len = torch.randint(3, 7, (batch,), generator=generator)
    ids = torch.empty(batch, length, dtype=torch.long)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(batch):
        motif = torch.randint(1, vocab, (int(motif_len[b]),), generator=generator)
        ids[b] = motif.repeat(length // len(motif) + 1)[:length]
        pad = int(torch.randint(0, length // 4, (1,), generator=generator))
        ids[b, :pad], mask[b, :pad] = 0, 0
    return ids, mask


def fmt(ratios) -> str:
    return "(" + ", ".join(f"{r:.2f}" for r in ratios) + ")"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    data = torch.Generator().manual_seed(args.seed + 1)
    vocab, ratios = 64, (0.3, 0.1, 0.6)
    model = TinyDecoder(vocab, d_model=64, layers=2, num_heads=8, num_kv_heads=4, ratios=ratios)
    print(f"mixsga {mixsga.__version__} ({mixsga.library_path()})")
    print(f"2-layer decoder, ratios {ratios} -> KV budget {100 * mixsga.kv_fraction((1, 2, 4), ratios):.0f} % "
          f"of the base model's cache; {sum(p.numel() for p in model.parameters())} parameters")
    # AdamW as in the paper's continued pretraining (betas 0.9/0.95, weight decay 0.1, clip 1.0).
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)

    def lr_factor(i: int) -> float:  # linear warmup, then cosine decay to 0
        if i < warmup:
            return (i + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, args.steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)

    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids, mask = make_batch(args.batch, args.length, vocab, data)
        logits, aux, attention_inputs = model(ids, mask)
        target_valid = mask[:, 1:].bool() & mask[:, :-1].bool()
        ce = F.cross_entropy(logits[:, :-1][target_valid], ids[:, 1:][target_valid])
        loss = ce + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()

        if step == 1 or step % max(1, args.steps // 5) == 0 or step == args.steps:
            parts = []
            for layer, (block, h) in enumerate(zip(model.blocks, attention_inputs)):
                r = block.attn.routing_agreement(h, mask)
                parts.append(f"L{layer} expert-choice {fmt(r.expert_choice_ratios)} argmax {fmt(r.argmax_ratios)} "
                             f"agree {100 * r.agreement:.0f}%")
            print(f"step {step:3d}  loss {loss.item():.4f}  ce {ce.item():.4f}  aux {aux.item():.4f}")
            print("          realised routing ratios: " + "; ".join(parts))
    print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
