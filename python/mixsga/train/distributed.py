"""DDP / FSDP2 set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a no-op single process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistributedContext:
    """Joins the process group when launched by torchrun (gloo on CPU, nccl on CUDA); otherwise returns
    a single-process context. Idempotent."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistributedContext(rank, world_size, dev)


def shard_fsdp2(model: torch.nn.Module, mp_policy=None) -> torch.nn.Module:
    """Shards ``model`` with FSDP2 (``torch.distributed.fsdp.fully_shard``), in place: every decoder layer
    (the ``layers`` of a Hugging Face model's decoder stack) as one unit, then the rest. Convert the model
    (``mixsga.hf.convert``) and load its weights first; build the optimizer after. ``mp_policy``: an optional
    ``torch.distributed.fsdp.MixedPrecisionPolicy`` (e.g. param_dtype=torch.bfloat16,
    reduce_dtype=torch.float32); the default keeps the parameters' dtype. Needs an initialised process group.

    Raises:
        RuntimeError: no process group is initialised (run under torchrun and call init_distributed).
    """
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise RuntimeError("shard_fsdp2: no process group; launch with torchrun and call init_distributed() first")
    kwargs = {} if mp_policy is None else {"mp_policy": mp_policy}
    stacks = [m for m in model.modules() if isinstance(getattr(m, "layers", None), torch.nn.ModuleList)]
    for stack in stacks[:1]:
        for layer in stack.layers:
            fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) of an FSDP2-sharded model as full tensors on the CPU, as a
    single-process run would save them. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optimizer_state: dict) -> None:
    """Loads full (unsharded) states, as ``full_state`` returns them, into an FSDP2-sharded model and its
    optimizer. Every rank calls it with the same states."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True))
