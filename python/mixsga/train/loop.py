"""The training loop: AdamW + cosine schedule + clipping + accumulation + aux loss, checkpointed, DDP-ready."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .data import TokenBlocks
from .distributed import DistributedContext
from .schedule import cosine_with_warmup


@dataclass
class TrainConfig:
    """Hyper-parameters; defaults are the paper's continued-pretraining recipe (METHOD.md)."""

    steps: int = 100  #: optimizer steps
    batch_size: int = 8  #: blocks per micro-batch (per rank)
    grad_accum: int = 1  #: micro-batches per optimizer step
    lr: float = 2e-4
    warmup_steps: int | None = None  #: None: 1.5 % of steps (at least 1)
    min_lr_ratio: float = 0.1  #: the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  #: max global gradient norm (0 = no clipping)
    precision: str = "fp32"  #: "fp32" or "bf16" (autocast)
    seed: int = 0
    checkpoint_path: str | None = None  #: where to save (and resume from)
    checkpoint_every: int = 0  #: save every N steps (0 = only at the end when checkpoint_path is set)
    resume: bool = True  #: continue from checkpoint_path when it exists
    stop_after: int | None = None  #: end this call after this optimizer step (a time slot); resume later
    progress: bool = True  #: tqdm bar (rank 0 only)
    description: str = "train"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr: must be finite and > 0, got {self.lr}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision: must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip: must be >= 0, got {self.grad_clip}")
        if self.warmup_steps is None:
            self.warmup_steps = max(1, round(0.015 * self.steps))
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps: must be in [0, steps = {self.steps}], got {self.warmup_steps}")


@dataclass
class TrainResult:
    steps: int  #: optimizer steps done in total (including resumed ones)
    seconds: float  #: wall time of this call
    losses: list[float] = field(default_factory=list)  #: LM loss per optimizer step of this call
    aux_losses: list[float] = field(default_factory=list)  #: aux loss per optimizer step of this call


def _default_aux_loss(model: torch.nn.Module) -> torch.Tensor:
    try:
        from ..hf import aux_loss
    except ImportError:  # transformers not installed: no mixSGA HF layers either
        return torch.zeros(())
    return aux_loss(model)


def train(
    model: torch.nn.Module,
    data: TokenBlocks,
    config: TrainConfig,
    aux_loss_fn: Callable[[torch.nn.Module], torch.Tensor] | None = None,
    ctx: DistributedContext | None = None,
) -> TrainResult:
    """Trains a causal LM (``model(input_ids=..., labels=...).loss``, Hugging Face style) in place.

    Loss per micro-batch = LM loss + ``aux_loss_fn(model)`` (default ``mixsga.hf.aux_loss``: the mean of
    the mixSGA layers' aux losses, i.e. alpha / N_layers summed over layers; 0 for other models).
    Under torchrun pass ``ctx = init_distributed()``: the model is wrapped in DDP and each rank trains on
    its own batches; rank 0 writes checkpoints and shows progress. With ``config.checkpoint_path`` set
    and ``config.resume``, an existing checkpoint is loaded first and training continues exactly where it
    stopped (model, optimizer, schedule, RNG and data order).
    """
    ctx = ctx or DistributedContext()
    aux_loss_fn = aux_loss_fn or _default_aux_loss
    torch.manual_seed(config.seed)
    model.to(ctx.device).train()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=config.betas,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, config.steps, config.warmup_steps, config.min_lr_ratio)
    )
    start = 0
    ckpt = Path(config.checkpoint_path) if config.checkpoint_path else None
    if ckpt is not None and config.resume and ckpt.is_file():
        state = load_checkpoint(ckpt)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start = int(state["step"])

    net = DistributedDataParallel(model) if ctx.enabled else model
    batches = data.batches(config.batch_size, config.seed, ctx.rank, ctx.world_size)
    for _ in range(start * config.grad_accum):  # the data order continues where the checkpoint stopped
        next(batches)
    autocast = (
        torch.autocast(ctx.device.type, dtype=torch.bfloat16) if config.precision == "bf16" else contextlib.nullcontext()
    )
    bar = None
    if config.progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc=config.description, unit="step", dynamic_ncols=True)

    result = TrainResult(steps=start, seconds=0.0)
    t0 = time.perf_counter()
    end = config.steps if config.stop_after is None else min(config.steps, config.stop_after)
    for step in range(start, end):
        lm_total, aux_total = 0.0, 0.0
        for micro in range(config.grad_accum):
            batch = next(batches).to(ctx.device)
            sync = micro == config.grad_accum - 1 or not ctx.enabled
            with (contextlib.nullcontext() if sync else net.no_sync()):
                with autocast:  # the forward only: backward runs in the forward's dtypes
                    lm = net(input_ids=batch, labels=batch).loss
                    aux = aux_loss_fn(model).to(lm.device, torch.float32)
                ((lm.float() + aux) / config.grad_accum).backward()
            lm_total += float(lm.detach()) / config.grad_accum
            aux_total += float(aux.detach()) / config.grad_accum
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(lm_total)
        result.aux_losses.append(aux_total)
        result.steps = step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{lm_total:.3f}", aux=f"{aux_total:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        last = step + 1 == end
        if ckpt is not None and ctx.is_main and (last or (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0)):
            save_checkpoint(ckpt, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "scheduler": scheduler.state_dict(), "rng": rng_state(), "step": step + 1,
                                   "config": asdict(config)})
    if bar is not None:
        bar.close()
    result.seconds = time.perf_counter() - t0
    return result
