"""The training loop: AdamW + cosine schedule + clipping + accumulation + aux loss, checkpointed, DDP-ready."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import torch
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .data import TokenBlocks
from .distributed import DistributedContext, full_state, load_full_state, shard_fsdp2
from .evaluate import no_cache_kwargs
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
    precision: str = "fp32"  #: "fp32" or "bf16" (autocast: fp32 weights and optimizer, bf16 compute)
    #: how several ranks (torchrun) share the work: "ddp" (a full model per rank, gradients all-reduced) or
    #: "fsdp2" (parameters, gradients and optimizer state sharded per decoder layer, for models that do not
    #: fit one device); one rank trains the same either way.
    parallel: str = "ddp"
    seed: int = 0
    checkpoint_path: str | None = None  #: where to save (and resume from)
    checkpoint_every: int = 0  #: save every N steps (0 = only at the end when checkpoint_path is set)
    resume: bool = True  #: continue from checkpoint_path when it exists
    stop_after: int | None = None  #: end this call after this optimizer step (a time slot); resume later
    progress: bool = True  #: rank 0 reports progress: a tqdm bar on a terminal, else a line every log_every steps
    log_every: int = 10  #: steps between progress lines when the output is not a terminal (a log file, CI)
    description: str = "train"
    #: lr multiplier per parameter-name substring: a trainable parameter whose name contains a key (the
    #: first matching key, in insertion order) is trained at lr * multiplier in its own AdamW group;
    #: e.g. {"key_log_scale": 10.0}. Weight decay follows the usual rule (none for 0/1-dim tensors).
    lr_multipliers: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr: must be finite and > 0, got {self.lr}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision: must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.parallel not in ("ddp", "fsdp2"):
            raise ValueError(f"parallel: must be 'ddp' or 'fsdp2', got {self.parallel!r}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip: must be >= 0, got {self.grad_clip}")
        if self.log_every < 1:
            raise ValueError(f"log_every: must be >= 1, got {self.log_every}")
        if not isinstance(self.lr_multipliers, dict):
            raise TypeError(f"lr_multipliers: expected a dict of name substring -> float, got {type(self.lr_multipliers).__name__}")
        for key, value in self.lr_multipliers.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"lr_multipliers: keys must be non-empty parameter-name substrings, got {key!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"lr_multipliers[{key!r}]: must be a finite number > 0, got {value!r}")
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
    """The aux loss the loop must add itself: that of mixSGA layers which return it with its graph
    (``aux_in_backward=False``); 0 for models whose layers send it through backward (their ``outputs.loss``
    holds it already) and for models without mixSGA layers."""
    try:
        from ..hf import aux_loss, is_converted
    except ImportError:  # transformers not installed: no mixSGA HF layers either
        return torch.zeros(())
    # Base and GQA models train with the same loop; hf.aux_loss itself rejects them (a likely mistake there).
    if not is_converted(model) or _loss_holds_aux(model):
        return torch.zeros(())
    return aux_loss(model)


def _loss_holds_aux(model: torch.nn.Module) -> bool:
    """Whether the model's training ``outputs.loss`` holds its aux loss (converted with aux_in_backward)."""
    try:
        from ..hf import is_converted, mixsga_layers
    except ImportError:
        return False
    return is_converted(model) and all(m.aux_in_backward for m in mixsga_layers(model))


def _run_settings(model: torch.nn.Module, config: TrainConfig, settings: dict | None) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint."""
    model_config = getattr(model, "config", None)
    run = {
        "mixsga": getattr(model_config, "mixsga", None),  # group sizes, ratios, extensions (mixsga.hf.convert)
        "num_key_value_heads": getattr(model_config, "num_key_value_heads", None),  # static GQA (to_gqa)
        "batch_size": config.batch_size, "grad_accum": config.grad_accum, "seed": config.seed,
        "parallel": config.parallel,
    }
    run.update(settings or {})
    return run


def _check_same_run(path: Path, stored: dict | None, current: dict) -> None:
    if stored is None:  # a checkpoint of an earlier version, which recorded no settings
        return
    changed = [k for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]
    if changed:
        k = changed[0]
        raise ValueError(
            f"resume: the checkpoint {str(path)!r} is of a run with {k}={stored.get(k)!r}, this run has "
            f"{k}={current.get(k)!r} (changed: {', '.join(changed)}); resume with the same settings, or train into "
            "another checkpoint path"
        )


def _param_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict]:
    """AdamW groups: decayed (>= 2-dim) and undecayed parameters at config.lr, then one such pair per
    lr_multipliers key (only the non-empty groups). Without multipliers the two groups are exactly the
    ones of earlier versions, so their checkpoints still load."""
    keys = list(config.lr_multipliers)
    buckets: dict[tuple[str | None, bool], list[torch.nn.Parameter]] = {}
    matched: set[str] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = next((k for k in keys if k in name), None)
        if key is not None:
            matched.add(key)
        buckets.setdefault((key, p.dim() >= 2), []).append(p)
    unmatched = [k for k in keys if k not in matched]
    if unmatched:  # most likely a typo, which would silently train at the base lr
        raise ValueError(
            f"lr_multipliers: the key {unmatched[0]!r} matches no trainable parameter name of {type(model).__name__}"
        )
    groups = [{"params": buckets.get((None, True), []), "weight_decay": config.weight_decay},
              {"params": buckets.get((None, False), []), "weight_decay": 0.0}]
    for key in keys:
        mult = float(config.lr_multipliers[key])
        for decay in (True, False):
            if (key, decay) in buckets:
                groups.append({"params": buckets[(key, decay)], "weight_decay": config.weight_decay if decay else 0.0,
                               "lr": config.lr * mult, "lr_multiplier": mult, "lr_key": key})
    return groups


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def describe(model: torch.nn.Module, config: TrainConfig, world_size: int = 1, start: int = 0) -> str:
    """One line with the run's settings and the model's mixSGA layout (ratios, KV budget), printed at
    the start of ``train`` so a log says what it is a log of (``start``: the step a resumed run continues at)."""
    resumed = f" (resuming at step {start})" if start else ""
    ranks = f"{world_size} rank(s)" + (f" ({config.parallel})" if world_size > 1 else "")
    parts = [f"{config.steps} steps{resumed}, batch {config.batch_size} x accum {config.grad_accum} x {ranks}",
             f"lr {config.lr:.2e} (warmup {config.warmup_steps}, min ratio {config.min_lr_ratio}, "
             f"weight decay {config.weight_decay}, clip {config.grad_clip})", config.precision]
    if config.lr_multipliers:
        parts.append("lr multipliers " + ", ".join(f"{k!r} x{v}" for k, v in config.lr_multipliers.items()))
    try:
        from ..hf import kv_fraction, mixsga_layers
    except ImportError:
        layers = []
    else:
        layers = mixsga_layers(model)
    if layers:
        layouts = sorted({(tuple(m.group_sizes), tuple(m.ratios)) for m in layers})
        text = "; ".join(f"group sizes {g} ratios {tuple(round(r, 4) for r in rs)}" for g, rs in layouts)
        parts.append(f"mixSGA in {len(layers)} layers: {text}, KV budget {100 * kv_fraction(model):.1f} % of the full cache")
    else:
        parts.append(f"{type(model).__name__} without mixSGA layers")
    return f"[{config.description}] " + "; ".join(parts)


def train(
    model: torch.nn.Module,
    data: TokenBlocks,
    config: TrainConfig,
    aux_loss_fn: Callable[[torch.nn.Module], torch.Tensor] | None = None,
    ctx: DistributedContext | None = None,
    stream: TextIO | None = None,
    settings: dict | None = None,
) -> TrainResult:
    """Trains a causal LM (``model(input_ids=..., labels=...).loss``, Hugging Face style) in place.

    Loss per micro-batch = ``outputs.loss`` + ``aux_loss_fn(model)``. A converted model's ``outputs.loss``
    already holds its aux loss (the mean of the mixSGA layers' aux losses, i.e. alpha / N_layers summed over
    layers), whose gradient its layers send through backward; the default ``aux_loss_fn`` adds it only for
    layers built with ``aux_in_backward=False``. The logged "loss" is the LM loss, "aux" the aux loss.
    Under torchrun pass ``ctx = init_distributed()``: the model is wrapped in DDP (or sharded with FSDP2,
    ``config.parallel``) and each rank trains on its own batches; rank 0 writes checkpoints (full tensors, the
    same file either way) and shows progress. Progress (``config.progress``) goes to
    ``stream`` (default ``sys.stdout``): a line with the settings and the model's ratios and KV budget, then
    a tqdm bar when the stream is a terminal, else a plain line every ``config.log_every`` steps (step,
    loss, aux, lr, tokens/s), so a log file stays readable. The forward runs with ``use_cache=False`` when
    the model takes it (a Hugging Face config defaults to caching, which would fill a throwaway cache).
    With ``config.checkpoint_path`` set
    and ``config.resume``, an existing checkpoint is loaded first and training continues exactly where it
    stopped (model, optimizer, schedule, RNG and data order). The checkpoint records the run's settings: the
    model's mixSGA settings (or its KV heads), the batch layout and ``settings`` (a JSON-like dict of the
    caller's, e.g. the data); resuming with any of them changed raises, naming what changed.
    """
    ctx = ctx or DistributedContext()
    aux_loss_fn = aux_loss_fn or _default_aux_loss
    torch.manual_seed(config.seed)
    model.to(ctx.device).train()
    sharded = ctx.enabled and config.parallel == "fsdp2"
    if sharded:  # before the optimizer, which must hold the sharded parameters
        shard_fsdp2(model)
    optimizer = torch.optim.AdamW(_param_groups(model, config), lr=config.lr, betas=config.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, config.steps, config.warmup_steps, config.min_lr_ratio)
    )
    start = 0
    run_settings = _run_settings(model, config, settings)
    ckpt = Path(config.checkpoint_path) if config.checkpoint_path else None
    if ckpt is not None and config.resume and ckpt.is_file():
        state = load_checkpoint(ckpt)
        _check_same_run(ckpt, state.get("settings"), run_settings)
        if sharded:
            load_full_state(model, optimizer, state["model"], state["optimizer"])
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start = int(state["step"])

    net = DistributedDataParallel(model) if ctx.enabled and not sharded else model
    batches = data.batches(config.batch_size, config.seed, ctx.rank, ctx.world_size)
    for _ in range(start * config.grad_accum):  # the data order continues where the checkpoint stopped
        next(batches)
    autocast = (
        torch.autocast(ctx.device.type, dtype=torch.bfloat16) if config.precision == "bf16" else contextlib.nullcontext()
    )
    forward_kwargs = no_cache_kwargs(model)
    loss_holds_aux = _loss_holds_aux(model)
    stream = sys.stdout if stream is None else stream
    show = config.progress and ctx.is_main
    bar = None
    if show:
        print(describe(model, config, ctx.world_size, start), file=stream, flush=True)
        if _is_terminal(stream):
            from tqdm.auto import tqdm

            bar = tqdm(total=config.steps, initial=start, desc=config.description, unit="step", dynamic_ncols=True,
                       file=stream)

    result = TrainResult(steps=start, seconds=0.0)
    t0 = time.perf_counter()
    t_line, tokens_line = t0, 0  # tokens/s of a progress line: over the steps since the previous line
    end = config.steps if config.stop_after is None else min(config.steps, config.stop_after)
    for step in range(start, end):
        lm_total, aux_total = 0.0, 0.0
        for micro in range(config.grad_accum):
            batch = next(batches).to(ctx.device)
            tokens_line += batch.numel() * ctx.world_size
            # DDP skips the all-reduce of all but the last micro-batch (FSDP2 reduces every one: still exact).
            sync = micro == config.grad_accum - 1 or not ctx.enabled or sharded
            with (contextlib.nullcontext() if sync else net.no_sync()):
                with autocast:  # the forward only: backward runs in the forward's dtypes
                    out = net(input_ids=batch, labels=batch, **forward_kwargs)
                    extra = aux_loss_fn(model).to(out.loss.device, torch.float32)
                # outputs.loss / grad_accum: the layers read the 1 / grad_accum from backward (mixsga.hf.hooks).
                ((out.loss.float() + extra) / config.grad_accum).backward()
            included = float(out["aux_loss"]) if loss_holds_aux else 0.0
            lm_total += (float(out.loss.detach()) - included) / config.grad_accum
            aux_total += (included + float(extra.detach())) / config.grad_accum
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(lm_total)
        result.aux_losses.append(aux_total)
        result.steps = step + 1
        last = step + 1 == end
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{lm_total:.3f}", aux=f"{aux_total:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        elif show and (last or (step + 1) % config.log_every == 0):
            now = time.perf_counter()
            print(f"[{config.description}] step {step + 1}/{config.steps} loss {lm_total:.4f} aux {aux_total:.4f} "
                  f"lr {scheduler.get_last_lr()[0]:.2e} tokens/s {tokens_line / max(now - t_line, 1e-9):.0f}",
                  file=stream, flush=True)
            t_line, tokens_line = now, 0
        if ckpt is not None and (last or (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0)):
            # FSDP2: every rank takes part in gathering the full tensors; rank 0 writes them.
            model_state, optimizer_state = (full_state(model, optimizer) if sharded
                                            else (model.state_dict(), optimizer.state_dict()))
            if ctx.is_main:
                save_checkpoint(ckpt, {"model": model_state, "optimizer": optimizer_state,
                                       "scheduler": scheduler.state_dict(), "rng": rng_state(), "step": step + 1,
                                       "config": asdict(config), "settings": run_settings})
    if bar is not None:
        bar.close()
    result.seconds = time.perf_counter() - t0
    return result
