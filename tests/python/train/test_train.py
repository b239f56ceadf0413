"""The training recipe: schedule, accumulation, exact resume, DDP under torchrun, atomic checkpoints."""

from __future__ import annotations

import math
import os
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


def test_ddp_two_ranks_under_torchrun_match_one_process(tmp_path):
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", worker, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # Two ranks with batch 2 each == one process with batch 4 (disjoint halves of the same batches).
    single = tiny_llama()
    train(single, tiny_data(), quiet(steps=3, batch_size=4, lr=1e-2, warmup_steps=1))
    for name, p in single.state_dict().items():
        torch.testing.assert_close(rank0[name], p, rtol=1e-9, atol=1e-11, msg=name)
