"""The demo's real English corpus (Debian's jargon-text and fortunes) and a byte-level BPE tokenizer for it."""

from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

JARGON = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
FORTUNES_DIR = Path("/usr/share/games/fortunes")


def load_corpus(max_chars: int | None = None) -> list[str]:
    """[the Jargon File (public domain), the fortunes databases], each whitespace-normalised and cut to
    ``max_chars`` characters when given.

    Raises FileNotFoundError naming the Debian package when a source is missing (scripts/bootstrap.sh
    installs both).
    """
    if not JARGON.is_file():
        raise FileNotFoundError(f"corpus: {JARGON} not found; install the Debian package jargon-text")
    parts = [gzip.open(JARGON, "rt", encoding="latin-1").read()]
    fortunes = sorted(p for p in FORTUNES_DIR.glob("*") if p.is_file() and p.suffix == "") if FORTUNES_DIR.is_dir() else []
    if not fortunes:
        raise FileNotFoundError(f"corpus: no fortunes under {FORTUNES_DIR}; install the Debian package fortunes-min")
    parts.append("\n".join(p.read_text(encoding="utf-8", errors="replace").replace("\n%\n", "\n\n") for p in fortunes))
    texts = [re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t]+", " ", t)) for t in parts]
    return texts if max_chars is None else [t[:max_chars] for t in texts]


def split_texts(texts: list[str], held_out_fraction: float) -> tuple[str, str]:
    """(train, held_out): the last ``held_out_fraction`` of every source is held out, so both splits
    cover both sources and no held-out text is seen in training (or by the tokenizer)."""
    train, held = [], []
    for t in texts:
        cut = t.rfind("\n", 0, int(len(t) * (1.0 - held_out_fraction)))
        cut = cut if cut > 0 else int(len(t) * (1.0 - held_out_fraction))
        train.append(t[:cut])
        held.append(t[cut:])
    return "\n".join(train), "\n".join(held)


def train_tokenizer(text: str, vocab_size: int, cache_dir: Path):
    """A byte-level BPE tokenizer (the `tokenizers` package) trained on ``text``, cached on disk by a
    hash of the text and vocabulary size. Returns a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    key = hashlib.sha256(f"{vocab_size}\n".encode() + text.encode()).hexdigest()[:16]
    path = cache_dir / f"tokenizer-{key}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(text.split("\n\n"), trainer=trainer)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return tokenizer
