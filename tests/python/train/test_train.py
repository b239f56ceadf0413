"""The training recipe: schedule, accumulation, exact resume, DDP under torchrun, atomic checkpoints."""

from __future__ import annotations

import io
import math
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from train_models import tiny_data, tiny_llama  # noqa: E402

import mixsga.hf  # noqa: E402
from mixsga.train import TrainConfig, cosine_with_warmup, load_checkpoint, perplexity, save_checkpoint, train  # noqa: E402


def quiet(**kw) -> TrainConfig:
    kw.setdefault("progress", False)
    return TrainConfig(**kw)


def test_schedule_warmup_then_cosine():
    assert cosine_with_warmup(0, 100, 10) == pytest.approx(0.1)
    assert cosine_with_warmup(9, 100, 10) == pytest.approx(1.0)
    assert cosine_with_warmup(10, 100, 10) == pytest.approx(1.0)
    mid = 10 + 45  # half way through the decay
    assert cosine_with_warmup(mid, 100, 10, min_ratio=0.0) == pytest.approx(0.5)
    assert cosine_with_warmup(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)
    assert cosine_with_warmup(500, 100, 10, min_ratio=0.1) == pytest.approx(0.1)
    values = [cosine_with_warmup(s, 100, 10) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_with_warmup(0, 10, 11)


def test_config_rejects_bad_values_naming_them():
    with pytest.raises(ValueError, match="precision: .*'fp16'"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="grad_accum: must be >= 1, got 0"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="parallel: must be 'ddp' or 'fsdp2', got 'zero3'"):
        TrainConfig(parallel="zero3")
    with pytest.raises(RuntimeError, match="shard_fsdp2: no process group"):
        mixsga.train.shard_fsdp2(tiny_llama())
    assert TrainConfig(steps=200).warmup_steps == 3  # 1.5 % of the steps, as in the paper


def test_training_lowers_the_loss_and_trains_the_router():
    model, data = tiny_llama(), tiny_data()
    router_before = [l.router.proj.weight.clone() for l in mixsga.hf.mixsga_layers(model)]
    ppl_before = perplexity(model, data.held_out)
    result = train(model, data, quiet(steps=30, batch_size=4, lr=1e-2))
    assert result.steps == 30 and len(result.losses) == 30
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    assert all(a > 0 for a in result.aux_losses)  # the aux loss is part of the objective
    assert all(not torch.equal(a, l.router.proj.weight) for a, l in zip(router_before, mixsga.hf.mixsga_layers(model)))
    assert math.isfinite(perplexity(model, data.held_out)) and perplexity(model, data.held_out) < ppl_before


def test_accumulating_half_batches_equals_one_full_batch():
    data = tiny_data()
    full, accum = tiny_llama(), tiny_llama()
    train(full, data, quiet(steps=3, batch_size=4, grad_accum=1, lr=1e-2, grad_clip=0.5))
    train(accum, data, quiet(steps=3, batch_size=2, grad_accum=2, lr=1e-2, grad_clip=0.5))
    for (name, a), b in zip(full.named_parameters(), accum.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


def test_resume_continues_bit_for_bit(tmp_path):
    data = tiny_data()
    straight = tiny_llama()
    train(straight, data, quiet(steps=6, batch_size=2, lr=1e-2))
    ckpt = tmp_path / "ckpt.pt"
    first = tiny_llama()
    train(first, data, quiet(steps=6, batch_size=2, lr=1e-2, checkpoint_path=str(ckpt), stop_after=3))
    assert load_checkpoint(ckpt)["step"] == 3
    resumed = tiny_llama(seed=123)  # different initial weights: everything must come from the checkpoint
    result = train(resumed, data, quiet(steps=6, batch_size=2, lr=1e-2, checkpoint_path=str(ckpt)))
    assert result.steps == 6 and len(result.losses) == 3
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_bf16_autocast_step_is_finite():
    model = tiny_llama(dtype=torch.float32)
    result = train(model, tiny_data(), quiet(steps=2, batch_size=2, precision="bf16"))
    assert all(math.isfinite(x) for x in result.losses + result.aux_losses)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "good.pt"
    save_checkpoint(path, {"step": 1})

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1  # the good file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.pt"]  # no temporary left behind
    with pytest.raises(FileNotFoundError, match="path: no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_ranks_under_torchrun_match_one_process(tmp_path, parallel):
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", worker, str(tmp_path), parallel]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt")
    if parallel == "ddp":
        rank1 = torch.load(tmp_path / "rank1.pt")
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), name
    # Two ranks with batch 2 each == one process with batch 4 (disjoint halves of the same batches).
    single = tiny_llama()
    train(single, tiny_data(), quiet(steps=3, batch_size=4, lr=1e-2, warmup_steps=1))
    for name, p in single.state_dict().items():
        torch.testing.assert_close(rank0[name], p, rtol=1e-9, atol=1e-11, msg=name)


class _Log(io.StringIO):
    """A non-terminal stream (a log file, CI), as the loop sees one."""

    def isatty(self):
        return False


def test_progress_on_a_non_terminal_stream_is_one_line_every_log_every_steps():
    log = _Log()
    train(tiny_llama(), tiny_data(), TrainConfig(steps=5, batch_size=2, log_every=2), stream=log)
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    # First the settings and the model's layout, then steps 2, 4 and the last one.
    assert lines[0].startswith("[train] 5 steps, batch 2 x accum 1 x 1 rank(s); lr 2.00e-04")
    assert "ratios (0.3, 0.1, 0.6)" in lines[0] and "KV budget 50.0 %" in lines[0]
    step = re.compile(r"\[train\] step (\d+)/5 loss (\d+\.\d{4}) aux (\d+\.\d{4}) lr (\S+) tokens/s (\d+)$")
    matches = [step.match(line) for line in lines[1:]]
    assert all(matches) and [int(m.group(1)) for m in matches] == [2, 4, 5], lines
    assert all(float(m.group(2)) > 0 and float(m.group(3)) > 0 and int(m.group(5)) > 0 for m in matches)
    # Off: nothing at all.
    quiet_log = _Log()
    train(tiny_llama(), tiny_data(), TrainConfig(steps=2, batch_size=2, progress=False), stream=quiet_log)
    assert quiet_log.getvalue() == ""


def test_progress_on_a_terminal_is_a_bar_after_the_settings_line():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    train(tiny_llama(), tiny_data(), TrainConfig(steps=3, batch_size=2, log_every=1), stream=term)
    first, rest = term.getvalue().split("\n", 1)
    assert first.startswith("[train] 3 steps") and "\r" in rest and "[train] step" not in rest


def test_lr_multipliers_give_their_own_param_groups(tmp_path):
    model = tiny_llama()
    ckpt = tmp_path / "ckpt.pt"
    config = TrainConfig(steps=2, batch_size=2, lr=1e-3, warmup_steps=0, progress=False, checkpoint_path=str(ckpt),
                         lr_multipliers={"router.proj": 10.0, "embed_tokens": 0.5})
    train(model, tiny_data(), config)
    # The optimizer the loop built (saved in its checkpoint): base groups first, then one pair per key,
    # each at lr * multiplier, with weight decay only for >= 2-dim tensors.
    groups = load_checkpoint(ckpt)["optimizer"]["param_groups"]
    summary = [(g.get("lr_key"), g["initial_lr"], g["weight_decay"], len(g["params"])) for g in groups]
    assert summary == [(None, 1e-3, 0.1, summary[0][3]), (None, 1e-3, 0.0, summary[1][3]),
                       ("router.proj", pytest.approx(1e-2), 0.1, 2), ("router.proj", pytest.approx(1e-2), 0.0, 2),
                       ("embed_tokens", pytest.approx(5e-4), 0.1, 1)]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(i for g in groups for i in g["params"]) == list(range(len(names)))  # each parameter once
    # Which parameters: the same grouping, rebuilt, by name.
    from mixsga.train.loop import _param_groups

    name_of = {id(p): n for n, p in model.named_parameters()}
    rebuilt = [[name_of[id(p)] for p in g["params"]] for g in _param_groups(model, config)]
    assert rebuilt[2] == [n for n in names if n.endswith("router.proj.weight")]
    assert rebuilt[3] == [n for n in names if n.endswith("router.proj.bias")]
    assert rebuilt[4] == ["model.embed_tokens.weight"]
    assert not any("router.proj" in n or "embed_tokens" in n for g in rebuilt[:2] for n in g)


@pytest.mark.parametrize("value, fragment", [
    (0.0, r"lr_multipliers\['router'\]: must be a finite number > 0, got 0.0"),
    (-1.0, r"lr_multipliers\['router'\]: must be a finite number > 0, got -1.0"),
    (float("nan"), r"lr_multipliers\['router'\]: must be a finite number > 0, got nan"),
    (float("inf"), r"lr_multipliers\['router'\]: must be a finite number > 0, got inf"),
    (True, r"lr_multipliers\['router'\]: must be a finite number > 0, got True"),
    ("2", r"lr_multipliers\['router'\]: must be a finite number > 0, got '2'"),
])
def test_lr_multipliers_reject_bad_values_naming_the_key(value, fragment):
    with pytest.raises(ValueError, match=fragment):
        TrainConfig(lr_multipliers={"router": value})


def test_lr_multipliers_reject_keys_that_match_nothing():
    with pytest.raises(ValueError, match=r"lr_multipliers: keys must be non-empty .*got ''"):
        TrainConfig(lr_multipliers={"": 2.0})
    with pytest.raises(ValueError, match=r"lr_multipliers: the key 'key_log_scale' matches no trainable parameter "
                                         r"name of LlamaForCausalLM"):
        train(tiny_llama(), tiny_data(), quiet(steps=1, batch_size=2, lr_multipliers={"key_log_scale": 10.0}))


def test_training_and_evaluation_build_no_cache(monkeypatch):
    import transformers

    built = []
    for cls in (mixsga.hf.MixSGACache, transformers.DynamicCache):
        init = cls.__init__

        def counting(self, *args, _init=init, _cls=cls, **kwargs):
            built.append(_cls.__name__)
            _init(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", counting)
    data = tiny_data()
    for model in (tiny_llama(), tiny_llama(mixsga_layers=False)):
        assert model.config.use_cache  # the Hugging Face default the loop must override
        train(model, data, quiet(steps=2, batch_size=2))
        perplexity(model, data.held_out)
    assert built == []
    # The counter works: an eval forward with the config's default builds one (a training one never does).
    tiny_llama().train()(input_ids=data.held_out[:1])
    assert built == []
    tiny_llama().eval()(input_ids=data.held_out[:1])
    assert built == ["MixSGACache"]


def test_unconverted_models_train_with_a_zero_aux_loss():
    result = train(tiny_llama(mixsga_layers=False), tiny_data(), quiet(steps=2, batch_size=2))
    assert result.aux_losses == [0.0, 0.0] and all(math.isfinite(x) for x in result.losses)
