"""Run by torchrun in test_train.py: a few DDP steps of a tiny mixSGA Llama; each rank saves its weights."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from train_models import tiny_data, tiny_llama  # noqa: E402

from mixsga.train import TrainConfig, init_distributed, train  # noqa: E402

if __name__ == "__main__":
    out_dir = sys.argv[1]
    ctx = init_distributed("cpu")
    model = tiny_llama()
    config = TrainConfig(steps=3, batch_size=2, lr=1e-2, warmup_steps=1, progress=False)
    train(model, tiny_data(), config, ctx=ctx)
    torch.save(model.state_dict(), os.path.join(out_dir, f"rank{ctx.rank}.pt"))
    torch.distributed.destroy_process_group()
