"""Continued pretraining of a Llama-style model converted to mixSGA, with `mixsga.train` (the paper's recipe).

A small Llama (transformers.LlamaConfig; sizes below) is converted with `mixsga.hf.convert` (or
`mixsga.hf.to_gqa` for --ratios gqa) and trained on Debian's jargon-text + fortunes with AdamW(0.9, 0.95),
cosine schedule with warmup, clipping, accumulation, fp32/bf16 and the aux loss of every layer. A
checkpoint is written atomically to <out>/checkpoint.pt; running the same command again resumes from it
(with other --ratios, or another model, it refuses, naming what changed). The same command runs under DDP
or FSDP2 (--parallel; gloo on CPU, nccl on GPU):

    PYTHONPATH=build/python .venv/bin/python examples/python/train.py --steps 50 --out out/train
    PYTHONPATH=build/python .venv/bin/torchrun --nproc_per_node=2 examples/python/train.py --steps 50 --parallel fsdp2

To fine-tune a model of your own (a Hugging Face folder or the offline SmolLM2) on your files, use the
`mixsga-train` command (python -m mixsga.train --help).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mixsga import hf
from mixsga.train import TrainConfig, init_distributed, perplexity, train
from mixsga_demo.corpus import load_corpus, split_texts, train_tokenizer
from mixsga.train.data import TokenBlocks


def _ratios(text: str):
    """'gqa' or three comma-separated capacity ratios over group sizes (1, 2, 4)."""
    if text == "gqa":
        return text
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratios: expected 'gqa' or three numbers like 0.3,0.1,0.6, got {text!r}")
    if len(values) != 3 or any(v < 0 for v in values) or abs(sum(values) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"--ratios: expected three non-negative numbers summing to 1, got {text!r}")
    return values


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the module docstring's layout and shows every option's default."""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--out", default="out/train", help="folder for the tokenizer and checkpoint")
    p.add_argument("--ratios", type=_ratios, default=(0.3, 0.1, 0.6),
                   help="capacity ratios over group sizes (1,2,4), or 'gqa' for the static GQA baseline (2 KV heads)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="blocks per micro-batch per rank")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast forward")
    p.add_argument("--parallel", choices=("ddp", "fsdp2"), default="ddp",
                   help="under torchrun: DDP, or FSDP2 (parameters sharded per decoder layer)")
    p.add_argument("--aux-alpha", type=float, default=0.1, help="aux-loss weight alpha")
    p.add_argument("--aux-loss", choices=("sigmoid_ce", "logit_ce", "bce"), default="sigmoid_ce",
                   help="router aux loss")
    p.add_argument("--base", default=None, help="state dict of a LlamaForCausalLM with these sizes (optional)")
    p.add_argument("--hidden", type=int, default=256, help="model width (8 query heads, 4 KV heads)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--block", type=int, default=128, help="tokens per training block")
    p.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary trained on the corpus")
    p.add_argument("--checkpoint-every", type=int, default=25, help="steps between checkpoints")
    p.add_argument("--log-every", type=int, default=10,
                   help="steps between progress lines when stdout is not a terminal (a terminal shows a bar)")
    p.add_argument("--max-chars", type=int, default=None, help="use only this many corpus characters")
    p.add_argument("--threads", type=int, default=2, help="torch threads per process")
    args = p.parse_args()
    for name in ("steps", "batch_size", "grad_accum", "hidden", "layers", "block", "vocab", "threads", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.hidden % 8:
        p.error(f"--hidden: must be a multiple of 8 (8 query heads), got {args.hidden}")
    torch.set_num_threads(args.threads)

    import transformers

    ctx = init_distributed()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_text, held_text = split_texts(load_corpus(args.max_chars), held_out_fraction=0.1)
    if ctx.is_main:  # rank 0 trains (and caches) the tokenizer; the others read the cached file
        tokenizer = train_tokenizer(train_text, args.vocab, out)
    if ctx.enabled:
        torch.distributed.barrier()
    if not ctx.is_main:
        tokenizer = train_tokenizer(train_text, args.vocab, out)
    train_ids = torch.tensor(tokenizer.encode(train_text).ids)
    held_ids = torch.tensor(tokenizer.encode(held_text).ids)
    frac = held_ids.numel() / (train_ids.numel() + held_ids.numel())
    data = TokenBlocks(torch.cat([train_ids, held_ids]), args.block, held_out_fraction=frac)

    torch.manual_seed(0)  # identical initial weights on every rank
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=max(512, 2 * args.block), tie_word_embeddings=True))
    if args.base:
        model.load_state_dict(torch.load(args.base, map_location="cpu"))
    if args.ratios == "gqa":
        hf.to_gqa(model, kv_heads=2)
    else:
        hf.convert(model, group_sizes=(1, 2, 4), ratios=args.ratios, aux_alpha=args.aux_alpha, aux_loss=args.aux_loss)

    if ctx.is_main:  # the run's model at the top of the log (the loop's first line adds the training settings)
        budget = 100 * hf.kv_fraction(model) if args.ratios != "gqa" else 100 * 2 / 4
        layout = "static GQA baseline, 2 of 4 KV heads" if args.ratios == "gqa" else (
            f"mixSGA ratios {args.ratios} over group sizes (1, 2, 4), aux {args.aux_loss} alpha {args.aux_alpha}")
        print(f"[train] model: Llama, {args.layers} layers, width {args.hidden}, 8 query / 4 KV heads, vocab "
              f"{args.vocab}, blocks of {args.block} tokens; {layout}; KV budget {budget:.1f} % of the full cache",
              flush=True)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                         precision=args.precision, parallel=args.parallel, checkpoint_path=str(out / "checkpoint.pt"),
                         checkpoint_every=args.checkpoint_every, log_every=args.log_every, description="train")
    result = train(model, data, config, ctx=ctx)
    sharded = ctx.enabled and args.parallel == "fsdp2"
    if ctx.is_main:
        # FSDP2: rank 0 alone cannot run the sharded model (mixsga-train evaluates a gathered copy).
        ppl = "n/a (sharded)" if sharded else f"{perplexity(model, data.held_out[:16]):.2f}"
        print(f"[train] {result.steps} steps in {result.seconds:.1f} s; held-out ppl {ppl}; "
              f"checkpoint {config.checkpoint_path}")
    if ctx.enabled:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
