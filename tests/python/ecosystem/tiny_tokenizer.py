"""A word-level tokenizer over the tiny models' 64 ids, built offline (no hub): ids 0-3 are <pad>, <s>,
</s>, <unk> (the tiny configs' pad/bos/eos ids), ids 4-63 the words "w4" ... "w63"."""

from __future__ import annotations

import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


def tiny_tokenizer(vocab_size: int = 64) -> transformers.PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def words(ids) -> str:
    """Token ids (>= 4) as the text that tokenizes back to them."""
    return " ".join(f"w{int(i)}" for i in ids)
