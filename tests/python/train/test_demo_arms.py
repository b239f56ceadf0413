"""The demo's arms: layer-mixed static GQA (the SmolLM2 baseline at 50 %), budgets, report rendering."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# The demo is an application in examples/python, not part of the installed package.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples", "python"))
from train_models import tiny_llama  # noqa: E402

import mixsga.hf  # noqa: E402
from mixsga.nn.shared_group_kv import pool_kv_weight  # noqa: E402
from mixsga_demo import demo  # noqa: E402


def test_every_model_names_its_verdict_arms_and_every_mixsga_arm_fits_its_groups():
    for name, spec in demo.MODELS.items():
        names = [a.name for a in spec.arms]
        assert spec.static_50 in names and spec.mixsga_50 in names, name
        assert len(set(names)) == len(names), name
        for arm in spec.arms:
            if arm.method == "mixsga":
                assert len(arm.ratios) == len(spec.groups) and math.isclose(sum(arm.ratios), 1.0), arm
                budget = sum(r / g for r, g in zip(arm.ratios, spec.groups))
                assert f"({round(100 * budget)}%)" in arm.name, (arm, budget)  # the name states the budget


def _data():
    from mixsga.train.data import TokenBlocks

    return TokenBlocks(torch.randint(0, 50, (4000,), generator=torch.Generator().manual_seed(0)), 16)


def test_layer_mixed_gqa_pools_all_but_every_kth_layer_and_matches_a_hand_pooled_forward():
    torch.manual_seed(0)
    base = tiny_llama(mixsga_layers=False)  # 2 layers, 4 KV heads, float64
    model, fraction = demo._make_arm(base, demo.Arm("mixed", "gqa", kv_heads=1, keep_every=2),
                                     demo.MODELS["tiny"], demo.DemoConfig.quick(), _data())
    assert demo._layer_kv_heads(model) == [4, 1]  # layer 0 kept, layer 1 pooled to one head
    assert fraction == pytest.approx((4 + 1) / 8)
    assert demo._layer_kv_heads(base) == [4, 4]  # the base model is not touched
    kept, pooled = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    torch.testing.assert_close(kept.k_proj.weight, base.model.layers[0].self_attn.k_proj.weight, rtol=0, atol=0)
    d = pooled.head_dim
    torch.testing.assert_close(pooled.v_proj.weight, pool_kv_weight(base.model.layers[1].self_attn.v_proj.weight, 4, d))
    # Independent reference: pool layer 1 by repeating its single head's K/V 4 times in the base model.
    ref = tiny_llama(mixsga_layers=False)
    ref.load_state_dict(base.state_dict())
    attn = ref.model.layers[1].self_attn
    with torch.no_grad():
        for proj in (attn.k_proj, attn.v_proj):
            proj.weight.copy_(pool_kv_weight(proj.weight, 4, d).repeat(4, 1))
    ids = torch.randint(0, 50, (2, 10))
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-10, atol=1e-10)
    # The measured cache is as small as the budget says: 4 + 1 heads instead of 4 + 4.
    out = model.generate(ids[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    full = base.generate(ids[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    ratio = demo._cache_bytes_per_token(out.past_key_values, model) / demo._cache_bytes_per_token(full.past_key_values, base)
    assert ratio == pytest.approx(fraction)


def test_mixsga_and_static_arms_report_their_budgets():
    base = tiny_llama(mixsga_layers=False)
    spec, cfg = demo.MODELS["tiny"], demo.DemoConfig.quick()
    budgets = {a.name: demo._make_arm(base, a, spec, cfg, _data())[1] for a in spec.arms}
    assert budgets["base (100%)"] == 1.0 and budgets["GQA-50%"] == pytest.approx(0.5)
    assert budgets["mixSGA+E1-E3 3:1:6 (50%)"] == pytest.approx(0.5)
    assert budgets["mixSGA 3:1:6 (50%)"] == pytest.approx(0.5) and budgets["mixSGA 1:1:8 (35%)"] == pytest.approx(0.35)


def test_demo_config_rejects_an_unknown_model_naming_it():
    with pytest.raises(ValueError, match="model: expected one of .*'gpt5'"):
        demo.DemoConfig(model="gpt5")


@pytest.mark.parametrize("model", sorted(demo.MODELS))
def test_report_renders_plots_and_checks_for_both_models(tmp_path, model):
    spec = demo.MODELS[model]
    arms = [{"arm": a.name, "method": a.method, "ratios": a.ratios, "on_curve": a.on_curve,
             "kv_fraction": 0.5 if a.method != "base" else 1.0, "ppl_expert_choice": 10.0 + i, "ppl_argmax": 11.0 + i,
             "agreement": 0.9 if a.method == "mixsga" else None, "kv_bytes_per_token": 100.0,
             "kv_allocated_bytes_per_token": 150.0, "decode_tokens_per_s": 5.0,
             "decode_budget_plain": 0.55 if a.method == "mixsga" else None,
             "decode_budget_calibrated": 0.5 if a.method == "mixsga" else None,
             "decode_ratios": [0.5] * len(spec.groups) if a.method == "mixsga" else None, "sample": "text"}
            for i, a in enumerate(spec.arms)]
    report = {"model": model, "date": "2026-11-28", "machine": "x", "threads": 1, "torch": "t", "config": {},
              "static_50": spec.static_50, "mixsga_50": spec.mixsga_50, "wall_seconds": 60.0, "prompt": "p", "arms": arms}
    import json

    (tmp_path / "report.json").write_text(json.dumps(report))
    md = demo.render_markdown(report)
    (tmp_path / "report.md").write_text(md)
    demo.plot(report, tmp_path / "ppl_vs_kv.png")
    demo.check(tmp_path)
    assert f"{spec.mixsga_50} " in md and "| " + spec.static_50 + " |" in md
    assert "| 0.550 → 0.500 | 100 | 150 |" in md  # decode budget plain → calibrated, stored and allocated bytes
    mixsga_arm = next(a for a in arms if a["method"] == "mixsga")
    mixsga_arm["decode_budget_calibrated"] = None
    (tmp_path / "report.json").write_text(json.dumps(report))
    with pytest.raises(RuntimeError, match="decode_budget_calibrated"):
        demo.check(tmp_path)
    mixsga_arm["decode_budget_calibrated"] = 0.5
    arms[1]["ppl_argmax"] = float("nan")
    (tmp_path / "report.json").write_text(json.dumps(report))
    with pytest.raises(RuntimeError, match="ppl_argmax"):
        demo.check(tmp_path)
