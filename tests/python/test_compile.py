"""torch.compile(fullgraph=True) of a small decoder built from mixsga.nn.MixSGAAttention: no graph
breaks, and the same outputs and gradients as eager."""

from __future__ import annotations

import torch
from torch import nn

from mixsga.nn import MixSGAAttention


class Block(nn.Module):
    def __init__(self, d_model: int, **attention) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model)
        self.attn = MixSGAAttention(d_model, 4, 4, **attention)
        self.mlp_norm = nn.RMSNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.SiLU(), nn.Linear(2 * d_model, d_model))

    def forward(self, x, mask):
        a, aux = self.attn(self.attn_norm(x), mask)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), aux


class Decoder(nn.Module):
    """Two-layer decoder LM; returns (logits, mean of the layers' aux losses)."""

    def __init__(self, vocab: int = 64, d_model: int = 32, layers: int = 2, **attention) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(Block(d_model, **attention) for _ in range(layers))
        self.head = nn.Linear(d_model, vocab)

    def forward(self, ids, mask=None):
        x, aux = self.embed(ids), []
        for block in self.blocks:
            x, a = block(x, mask)
            aux.append(a)
        return self.head(x), torch.stack(aux).mean()


def train_step(model, ids, mask):
    """Loss = next-token CE + aux; returns (logits, aux, {name: grad})."""
    model.zero_grad(set_to_none=True)
    logits, aux = model(ids, mask)
    valid = mask[:, 1:].bool()
    ce = nn.functional.cross_entropy(logits[:, :-1][valid], ids[:, 1:][valid])
    (ce + aux).backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), aux.detach(), grads


def batch(B=2, L=16, vocab=64):
    ids = torch.randint(0, vocab, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :5] = 0
    return ids, mask


def assert_same_step(eager, compiled):
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-6)
    assert compiled[2].keys() == eager[2].keys()
    for name in eager[2]:
        torch.testing.assert_close(
            compiled[2][name], eager[2][name], rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}"
        )


def test_inductor_fullgraph_matches_eager():
    model = Decoder()
    ids, mask = batch()
    eager = train_step(model, ids, mask)
    assert eager[2]["blocks.0.attn.router.proj.weight"].abs().sum() > 0  # the aux loss reaches the router
    compiled = train_step(torch.compile(model, fullgraph=True), ids, mask)  # fullgraph: a break would raise
    assert_same_step(eager, compiled)


def test_dynamic_shapes_trace_once_without_breaks():
    """Symbolic sequence lengths go through every fake kernel: one graph serves every length."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    model = Decoder(prefill_routing="argmax", aux_loss="bce", bias=True)
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for L in (12, 19, 7):
        ids, mask = batch(L=L)
        assert_same_step(train_step(model, ids, mask), train_step(compiled, ids, mask))
        frames.append(counter.frame_count)
    assert frames[0] == frames[-1], f"recompiled for new sequence lengths: frames compiled {frames}"
    model_graphs = [g for g in counter.graphs if "torch.ops.mixsga" in g.code]
    assert len(model_graphs) == 1, f"{len(model_graphs)} graphs hold the model"
    assert "torch.ops.mixsga.grouped_kv_proj" in model_graphs[0].code
