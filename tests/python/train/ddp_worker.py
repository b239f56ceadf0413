"""Run by torchrun in test_train.py: a few DDP (or FSDP2: a second argument "fsdp2") steps of a tiny mixSGA
Llama; each rank saves its weights (FSDP2: rank 0 saves the full ones, from the final checkpoint)."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from train_models import tiny_data, tiny_llama  # noqa: E402

from mixsga.train import TrainConfig, init_distributed, train  # noqa: E402

if __name__ == "__main__":
    out_dir = sys.argv[1]
    parallel = sys.argv[2] if len(sys.argv) > 2 else "ddp"
    ctx = init_distributed("cpu")
    model = tiny_llama()
    checkpoint = os.path.join(out_dir, f"{parallel}.ckpt")
    config = TrainConfig(steps=3, batch_size=2, lr=1e-2, warmup_steps=1, progress=False, parallel=parallel,
                         checkpoint_path=checkpoint)
    train(model, tiny_data(), config, ctx=ctx)
    if parallel == "ddp":
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{ctx.rank}.pt"))
    elif ctx.rank == 0:  # the checkpoint holds the full tensors, gathered from the shards
        torch.save(torch.load(checkpoint, weights_only=False)["model"], os.path.join(out_dir, "rank0.pt"))
    torch.distributed.destroy_process_group()
