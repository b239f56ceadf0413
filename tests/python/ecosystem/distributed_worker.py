"""Run by torchrun (2 CPU processes, gloo) in test_distributed.py: one training step of a converted tiny Llama on
this rank's half of a fixed global batch, under FSDP2, accelerate's DDP or transformers' Trainer; rank 0 saves
every parameter's full gradient.

    python -m torch.distributed.run --nproc_per_node=2 distributed_worker.py MODE OUT_DIR
"""

import os
import sys

import torch
import torch.distributed as dist

HERE = os.path.dirname(__file__)
sys.path[:0] = [HERE, os.path.join(HERE, "..", "hf")]
import conftest  # noqa: E402,F401  (offline settings)
from test_aux_gradient import converted  # noqa: E402

GLOBAL_BATCH = torch.randint(3, 64, (4, 12), generator=torch.Generator().manual_seed(21))


def full_grads(model) -> dict:
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):  # FSDP2: a sharded DTensor
            g = g.full_tensor()
        if g is not None:
            grads[name.removeprefix("module.")] = g.detach().clone()
    return grads


def fsdp2(rank, world):
    import mixsga.hf
    import mixsga.train
    from tiny_models import tiny_model

    # Sharding before converting is refused (the routers would be plain, unsharded parameters).
    plain = mixsga.train.shard_fsdp2(tiny_model())
    try:
        mixsga.hf.convert(plain)
    except TypeError as error:
        assert "sharded with FSDP" in str(error), error
    else:
        raise AssertionError("convert accepted an FSDP-sharded model")
    model = converted()
    mixsga.train.shard_fsdp2(model)
    half = GLOBAL_BATCH.chunk(world)[rank]
    model(half, labels=half).loss.backward()
    return full_grads(model)


def accelerate_ddp(rank, world):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(converted())
    half = GLOBAL_BATCH.chunk(world)[rank]
    accelerator.backward(model(half, labels=half).loss)
    return full_grads(accelerator.unwrap_model(model))


def trainer(rank, world):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Spy(TrainerCallback):
        grads = None

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if Spy.grads is None:
                Spy.grads = full_grads(model)

    # Every rank holds the global batch's samples; the Trainer's distributed sampler gives each rank its own.
    data = [{"input_ids": s, "labels": s} for s in GLOBAL_BATCH]
    args = TrainingArguments(output_dir=os.path.join(sys.argv[2], "trainer"), per_device_train_batch_size=1,
                             gradient_accumulation_steps=2, max_steps=1, learning_rate=1e-2, max_grad_norm=0.0,
                             report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=3)
    Trainer(model=converted(), args=args, train_dataset=data, callbacks=[Spy()]).train()
    return Spy.grads


if __name__ == "__main__":
    mode, out_dir = sys.argv[1], sys.argv[2]
    if mode != "trainer":  # the Trainer joins the process group itself
        dist.init_process_group("gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    grads = {"fsdp2": fsdp2, "accelerate": accelerate_ddp, "trainer": trainer}[mode](rank, world)
    if rank == 0:
        torch.save({"grads": grads}, os.path.join(out_dir, f"{mode}.pt"))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
