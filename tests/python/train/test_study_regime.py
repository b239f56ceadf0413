"""The uptraining-budget study (examples/python/mixsga_demo/regime.py): its arms and budgets, the paired
statistics its verdict rests on, and the base model's resumable, curve-recording training."""

from __future__ import annotations

import math
import os
import statistics
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# The study is an application in examples/python, not part of the installed package.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples", "python"))
from train_models import tiny_data  # noqa: E402

from mixsga_demo import regime, regime_report  # noqa: E402
from mixsga_demo.base_model import base_model_path, cached_base_model, read_curve, small_llama_config  # noqa: E402
from mixsga_demo.study import BASELINES, make_arm  # noqa: E402


def test_every_arm_realises_its_stated_kv_budget_and_has_a_static_baseline():
    cfg = regime.RegimeConfig()
    names = [a.name for a in regime.ARMS + regime.PUSH_ARMS]
    assert len(set(names)) == len(names)
    for arm in regime.ARMS + regime.PUSH_ARMS:
        if arm.method == "gqa":
            assert math.isclose(arm.kv_heads / cfg.kv_heads, arm.budget), arm
            continue
        assert math.isclose(sum(arm.ratios), 1.0) and all(cfg.kv_heads % g == 0 for g in arm.groups), arm
        assert math.isclose(sum(r / g for r, g in zip(arm.ratios, arm.groups)), arm.budget), arm
        assert f"({round(100 * arm.budget)}%)" in arm.name, arm  # the name states the budget
        assert BASELINES[arm.budget] in names, arm


def test_budgets_become_steps_of_the_base_tokens_and_the_watched_runs_are_evaluated_along_the_way():
    cfg = regime.RegimeConfig()
    base_tokens = 6059 * 16 * 128  # one epoch of the study's train split
    steps = {b: regime.uptrain_steps(cfg, b, base_tokens) for b in cfg.budgets}
    assert steps == {0.001: 12, 0.003: 36, 0.01: 121, 0.03: 364, 0.1: 1212}
    for b, n in steps.items():  # each run sees its share of the base's tokens, to the nearest step
        assert abs(n * cfg.batch * cfg.block - b * base_tokens) <= cfg.batch * cfg.block / 2
    assert regime.trajectory_points(cfg, 0.01, 121, base_tokens) == [2, 4, 8, 16, 32, 64]
    assert regime.trajectory_points(cfg, 0.1, 1212, base_tokens) == [12, 36, 121, 364]
    assert regime.trajectory_points(cfg, 0.03, 364, base_tokens) == []
    assert cfg.uptrain_lr == pytest.approx(cfg.base_lr / 2)  # the paper: 2e-4 against TinyLlama's 4e-4


def _row(arm: str, seed: int, budget: float, ppl: float, argmax: float | None = None) -> dict:
    return {"arm": arm, "seed": seed, "budget": budget, "tokens": int(1e6 * budget), "steps": int(1e3 * budget),
            "ppl_expert_choice": ppl, "ppl_argmax": ppl if argmax is None else argmax}


def test_the_paired_difference_and_its_standard_error_match_a_hand_computation():
    gqa, mix = regime.ARMS[0], regime.ARMS[2]  # GQA-50%, the paper's 3:1:6 at 50 %
    cfg = regime.RegimeConfig(budgets=(0.01,))
    gqa_ppl = {0: 40.0, 1: 42.0, 2: 41.0}
    mix_ppl = {0: 38.0, 1: 41.5, 2: 40.2}
    rows = [_row(gqa.name, s, 0.01, p) for s, p in gqa_ppl.items()]
    rows += [_row(mix.name, s, 0.01, p, argmax=p + 1.0) for s, p in mix_ppl.items()]
    rows.append(_row(mix.name, 7, 0.01, 10.0))  # a seed without its GQA run: not paired, left out
    result = regime_report.summarise(rows, [], (gqa, mix), cfg)
    cell = next(c for c in result["cells"] if c["arm"] == mix.name and c["budget"] == 0.01)
    rel = [100 * (mix_ppl[s] - gqa_ppl[s]) / gqa_ppl[s] for s in (0, 1, 2)]
    assert cell["vs_static"]["pairs"] == 3
    assert cell["vs_static"]["rel"] == pytest.approx(statistics.fmean(rel), rel=1e-12)
    assert cell["vs_static"]["rel_se"] == pytest.approx(statistics.stdev(rel) / math.sqrt(3), rel=1e-12)
    assert cell["vs_static"]["diff"] == pytest.approx(statistics.fmean(mix_ppl[s] - gqa_ppl[s] for s in (0, 1, 2)))
    # causal argmax is compared with the same GQA runs (GQA routes nothing)
    assert cell["vs_static_argmax"]["diff"] == pytest.approx(cell["vs_static"]["diff"] + 1.0)
    verdict = result["verdicts"]["0.5"][0]
    assert verdict["best_arm"] == mix.name and verdict["verdict"] == regime_report.classify(verdict["rel"], verdict["rel_se"])


def test_a_lead_is_called_only_beyond_two_standard_errors():
    assert regime_report.classify(-2.1, 1.0) == "mixSGA"
    assert regime_report.classify(-1.9, 1.0) == "tie"
    assert regime_report.classify(2.1, 1.0) == "static GQA"
    assert regime_report.classify(1.9, 1.0) == "tie"
    assert regime_report.classify(-5.0, float("nan")) == "one seed"


def test_frozen_parameters_are_not_trained_and_the_rest_are():
    cfg = regime.RegimeConfig.quick()
    base = _tiny_base()
    arm = regime.StudyArm("frozen routers (50%)", "mixsga", 0.5, groups=(1, 2, 4), ratios=(0.3, 0.1, 0.6),
                          frozen=("router",))
    model, _ = make_arm(base, arm, cfg, tiny_data(), seed=0)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all("router" in n for n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if "router" not in n)


def _tiny_base():
    config = small_llama_config(50, 32, 48, 1, 4, 4, 12, use_cache=False)
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def test_the_base_trained_in_slices_with_its_curve_equals_one_uninterrupted_run(tmp_path):
    data = tiny_data()
    config = small_llama_config(50, 32, 48, 1, 4, 4, 12, use_cache=False)
    whole = cached_base_model(config, data, tmp_path / "whole", 7, 3e-3, 4, 0, log=lambda _: None)
    held = data.held_out[:4]
    sliced = cached_base_model(config, data, tmp_path / "sliced", 7, 3e-3, 4, 0, log=lambda _: None,
                               curve_blocks=held, curve_every=3)
    for (name, a), b in zip(whole.state_dict().items(), sliced.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    path = base_model_path(config, data, tmp_path / "sliced", 7, 3e-3, 4, 0)
    curve = read_curve(path)
    assert [p["step"] for p in curve] == [0, 3, 6, 7]
    assert [p["tokens"] for p in curve] == [0, 3 * 4 * 12, 6 * 4 * 12, 7 * 4 * 12]  # steps x batch x block
    from mixsga.train.evaluate import perplexity

    assert curve[-1]["ppl"] == pytest.approx(perplexity(sliced, held), rel=1e-12)
    assert path.is_file() and not path.with_suffix(".ckpt").exists()  # cached; the checkpoint is gone
    with pytest.raises(ValueError, match="curve_blocks"):
        cached_base_model(config, data, tmp_path / "bad", 7, 3e-3, 4, 0, curve_every=3)
