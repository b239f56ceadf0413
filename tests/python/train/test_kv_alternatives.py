"""The equal-KV-bytes comparison (examples/python/mixsga_demo/kv_alternatives.py): its metrics against explicit
computations on a tiny random Llama, the bytes it counts for quantized and mixSGA caches, and the paired
statistics of its report."""

from __future__ import annotations

import copy
import math
import os
import statistics
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples", "python"))
from mixsga_demo import kv_alternatives as ka  # noqa: E402

transformers = pytest.importorskip("transformers")


def tiny_llama(kv_heads: int = 4, seed: int = 0):
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def eval_set(n=3, c=12, t=6, g=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 61, (n, c + t), generator=gen)
    return ka.eval_set_from_blocks(blocks, ka.Protocol(n, c, t, g))


@torch.no_grad()
def test_nll_and_argmax_through_the_cache_equal_a_no_cache_forward_and_greedy_an_explicit_loop():
    model = tiny_llama()
    es = eval_set()
    result = ka.run_protocol(model, es, ka.dynamic_cache_kind(model, model.config), batch_size=2)
    ids = torch.cat([es["context"], es["continuation"]], 1)
    c, t = es["context"].shape[1], es["continuation"].shape[1]
    logits = model(ids, use_cache=False).logits.double()[:, c - 1: c + t - 1]
    expected = -torch.log_softmax(logits, -1).gather(-1, es["continuation"][..., None])[..., 0]
    assert result["nll"].shape == (3, t)
    torch.testing.assert_close(result["nll"], expected, atol=1e-5, rtol=0)
    assert torch.equal(result["argmax"], logits.argmax(-1))
    # Greedy: re-run the whole sequence without a cache at every step.
    seq = es["context"].clone()
    for _ in range(es["greedy"]):
        nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    assert torch.equal(result["greedy"], seq[:, c:])
    assert result["kv_fraction"] == pytest.approx(1.0) and result["kv_fraction_end"] == pytest.approx(1.0)
    s = ka.score(result, result)
    assert s["nll"] == pytest.approx(float(expected.mean(1).mean()), abs=1e-6)
    assert s["ppl"] == pytest.approx(math.exp(s["nll"]))
    assert s["top1_agreement"] == 1.0 and s["greedy_agreement"] == 1.0
    assert s["per_sequence_top1"] == [1.0] * 3 and s["per_sequence_greedy"] == [1.0] * 3


@torch.no_grad()
def test_a_perturbed_model_agrees_less_and_agreement_is_counted_position_wise():
    model = tiny_llama()
    es = eval_set(n=4, t=8, g=8)
    ref = ka.run_protocol(model, es, ka.dynamic_cache_kind(model, model.config))
    other = copy.deepcopy(model)
    for p in other.parameters():
        p.add_(0.5 * torch.randn_like(p))
    got = ka.run_protocol(other, es, ka.dynamic_cache_kind(other, other.config))
    s = ka.score(got, ref)
    assert s["top1_agreement"] < 1.0 and s["greedy_agreement"] < 1.0
    top1 = (got["argmax"] == ref["argmax"]).double().mean(1)
    assert s["per_sequence_top1"] == pytest.approx(top1.tolist())
    assert s["top1_agreement"] == pytest.approx(float(top1.mean()))
    assert s["greedy_agreement"] == pytest.approx(float((got["greedy"] == ref["greedy"]).double().mean()))


@pytest.mark.parametrize("backend,nbits,group", [("hqq", 8, 16), ("hqq", 4, 8), ("quanto", 4, 16), ("quanto", 2, 8)])
@torch.no_grad()
def test_quantized_kv_fraction_is_the_hand_formula_and_counts_the_residual_at_bf16(backend, nbits, group):
    pytest.importorskip({"hqq": "hqq", "quanto": "optimum.quanto"}[backend])
    model = tiny_llama(kv_heads=2)  # head dim 16
    es = eval_set(n=2, c=12, t=3, g=2)
    kind = ka.quantized_cache_kind(model, backend, nbits, group, residual_length=4)
    result = ka.run_protocol(model, es, kind)
    q = (nbits / 8 + 2 * 2 / group) / 2  # payload + bf16 scale and zero per group, over 16 bits
    assert ka.quantized_fraction_formula(nbits, group) == pytest.approx(q)
    assert result["kv_fraction"] == pytest.approx(q, rel=1e-12)
    # After the prefill (12 tokens) and 2 decode steps (t - 1) with residual_length 4: 2 tokens wait at bf16.
    assert result["kv_fraction_end"] == pytest.approx((12 * q + 2 * 1.0) / 14, rel=1e-12)
    # And the model does see quantized keys: the NLL moves, a little.
    full = ka.run_protocol(model, es, ka.dynamic_cache_kind(model, model.config))
    assert not torch.allclose(result["nll"][:, 1:], full["nll"][:, 1:], atol=1e-7)
    torch.testing.assert_close(result["nll"][:, 0], full["nll"][:, 0])  # the prefill itself is not quantized


def test_a_group_size_that_does_not_divide_the_head_dim_is_refused():
    with pytest.raises(ValueError, match="does not divide"):
        ka.quantized_cache_kind(tiny_llama(), "quanto", 4, 12, 4)


@torch.no_grad()
def test_mixsga_kv_fraction_is_the_compact_caches_stored_over_full_after_the_context():
    hf = pytest.importorskip("mixsga.hf")
    model = tiny_llama(kv_heads=4)
    hf.convert(model, group_sizes=(1, 2, 4), ratios=(0.3, 0.1, 0.6), **hf.RECOMMENDED)
    calib = torch.randint(0, 61, (8, 40), generator=torch.Generator().manual_seed(5))
    hf.prepare(model, calib, router_steps=5)
    hf.calibrate_decode_routing(model, calib)
    model.eval()
    es = eval_set(n=3, c=20, t=4, g=3)
    result = ka.run_protocol(model, es, ka.mixsga_cache_kind(model))
    cache = hf.MixSGACache(model.config)
    model(es["context"], past_key_values=cache, use_cache=True)
    expected = cache.stored_bytes_per_token() / cache.full_bytes_per_token()
    assert result["kv_fraction"] == pytest.approx(expected, rel=1e-12)
    # Expert choice stores ceil(0.3 * 20) = 6, ceil(0.1 * 20) = 2 and 12 tokens per sequence and layer:
    # (6 + 2 / 2 + 12 / 4) / 20 = 0.5 of the K/V values, plus the expert index (2 bits a token, in bytes).
    values = 0.5 * cache.full_bytes_per_token() * cache.tokens_stored()
    assert cache.bytes_stored() - values == pytest.approx(2 * 3 * math.ceil(20 * 2 / 8), abs=0)
    tf = result["caches"][0]
    assert result["kv_fraction_end"] == pytest.approx(tf.stored_bytes_per_token() / tf.full_bytes_per_token())


def _row(method, family, target, per_seq, seed=None, kv=0.5):
    return {"model": ka.TESTBED, "method": method, "family": family, "target": target, "seed": seed,
            "kv_fraction": kv, "nll": statistics.fmean(per_seq), "per_sequence_nll": per_seq,
            "top1_agreement": 0.5, "greedy_agreement": 0.25}


def test_the_reports_paired_differences_and_standard_errors_are_the_hand_computation():
    full = [1.0, 2.0, 3.0, 4.0]
    quant = [1.5, 2.1, 3.4, 4.2]
    mix0, mix1 = [1.2, 2.4, 3.1, 4.6], [1.4, 2.2, 3.5, 4.4]
    rows = [_row("full", "full", 1.0, full, kv=1.0), _row("int4", "quantized KV", 0.5, quant),
            _row("worse", "quantized KV", 0.5, [x + 1 for x in quant]),
            _row("mix", "mixSGA uptrained", 0.5, mix0, seed=0), _row("mix", "mixSGA uptrained", 0.5, mix1, seed=1),
            {"model": ka.TESTBED, "method": "kvpress", "target": 0.0, "nll": None, "note": "not run: no env"}]
    summary = {s["method"]: s for s in ka.summarise(rows)}
    mix = summary["mix"]
    avg = [(a + b) / 2 for a, b in zip(mix0, mix1)]
    d = [a - b for a, b in zip(avg, full)]
    assert mix["d_full"] == pytest.approx(statistics.fmean(d))
    assert mix["d_full_se"] == pytest.approx(statistics.stdev(d) / 2)  # sqrt(4 sequences)
    per_seed = [statistics.fmean(mix0) - statistics.fmean(full), statistics.fmean(mix1) - statistics.fmean(full)]
    assert mix["d_full_se_seeds"] == pytest.approx(statistics.stdev(per_seed) / math.sqrt(2))
    # The best non-mixSGA method at the target is int4; int4's reference is the (only) mixSGA method.
    assert mix["best_other"] == "int4" and summary["int4"]["best_other"] == "mix"
    d = [a - b for a, b in zip(avg, quant)]
    assert mix["d_best"] == pytest.approx(statistics.fmean(d))
    assert mix["d_best_se"] == pytest.approx(statistics.stdev(d) / 2)
    assert summary["int4"]["d_best"] == pytest.approx(-statistics.fmean(d))
    assert mix["ppl"] == pytest.approx(math.exp(statistics.fmean(avg)))
    # Among the other kind's methods with no more KV bytes: int4 stores 0.5 (not more than mix's 0.5), and a
    # cheaper method of another target counts too; a dearer one does not.
    rows.append(_row("int2", "quantized KV", 0.25, [x - 0.5 for x in full], kv=0.25))
    rows.append(_row("int8", "quantized KV", 0.5, [x - 0.9 for x in full], kv=0.53))
    summary = {s["method"]: s for s in ka.summarise(rows)}
    mix = summary["mix"]
    assert mix["best_other"] == "int8" and mix["le_other"] == "int2"
    d = [a - b for a, b in zip(avg, [x - 0.5 for x in full])]
    assert mix["d_le"] == pytest.approx(statistics.fmean(d))
    assert mix["d_le_se"] == pytest.approx(statistics.stdev(d) / 2)
    assert summary["int2"].get("le_other") is None  # no mixSGA row stores <= 0.25
    assert "d_full" not in summary["full"]
    md = ka.render_markdown(rows)
    assert f"{mix['d_full']:+.4f} ± {mix['d_full_se']:.4f} (seeds ± {mix['d_full_se_seeds']:.4f})" in md
    assert "not run: no env" in md


def test_done_keys_skip_only_rows_with_a_result(tmp_path):
    path = tmp_path / "rows.jsonl"
    ka.append_row(path, _row("a", "quantized KV", 0.5, [1.0], seed=None))
    ka.append_row(path, {"model": ka.TESTBED, "method": "b", "target": 0.5, "seed": 0, "nll": None, "error": "x"})
    assert ka.done_keys(path) == {(ka.TESTBED, "a", 0.5, None)}


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_row("full", "full", 1.0, [1.0, 2.0], kv=1.0), _row("int4", "quantized KV", 0.25, [1.5, 2.5], kv=0.28)]
    ka.plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


@torch.no_grad()
def test_a_capped_mixsga_cache_keeps_every_sequence_within_the_cap_and_check_says_so():
    hf = pytest.importorskip("mixsga.hf")
    model = tiny_llama(kv_heads=4)
    hf.convert(model, group_sizes=(1, 2, 4), ratios=(0.5, 0.3, 0.2))  # a 0.7 budget, capped at 0.4 below
    model.eval()
    es = eval_set(n=3, c=20, t=4, g=3)
    ctx = type("Ctx", (), {})()
    ctx.eval_set = es
    ctx.row = lambda method, target, seed, family, result, seconds, note, details: {
        "model": ka.TESTBED, "method": method, "target": target, "seed": seed, "family": family,
        "kv_fraction": result["kv_fraction"], "nll": 1.0, "ppl": math.e, "top1_agreement": 1.0,
        "greedy_agreement": 1.0, "details": dict(details or {})}
    rows = ka.evaluate_mixsga(ctx, model, "m", 0.4, 0, "mixSGA at conversion", capped=True)
    by = {r["method"]: r for r in rows}
    assert set(by) == {"m", "m [argmax prefill]", "m [argmax prefill, cap]", "m [argmax prefill, cap, reserved]"}
    assert by["m [argmax prefill]"]["details"]["largest_sequence_share_end"] > 0.4  # uncapped: over
    for name in ("m [argmax prefill, cap]", "m [argmax prefill, cap, reserved]"):
        assert by[name]["details"]["largest_sequence_share_end"] <= 0.4 + 1e-12
    reserved = by["m [argmax prefill, cap, reserved]"]["details"]
    assert reserved["allocated_fraction_end"] <= 0.4 + 0.05  # the reserved pools, index bookkeeping aside
    full = {"model": ka.TESTBED, "method": "full", "target": 1.0, "seed": None, "family": "full", "kv_fraction": 1.0,
            "nll": 1.0, "ppl": math.e, "top1_agreement": 1.0, "greedy_agreement": 1.0}
    assert ka.check([full] + rows, kvpress=False) == []
    assert ka.check([full] + rows, kvpress=True) == [f"{ka.TESTBED}: no kvpress rows"]
    broken = dict(rows[2], details={**rows[2]["details"], "largest_sequence_share_end": 0.45})
    assert "stored 0.4500 > cap 0.4" in ka.check([full, broken], kvpress=False)[0]
    assert "boom" in ka.check([full, {**full, "method": "x", "nll": None, "error": "boom"}], kvpress=False)[0]
