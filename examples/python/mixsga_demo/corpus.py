"""Real English text from Debian packages: the demo's corpus (jargon-text and fortunes), the study's documents
(linux-doc-6.1 and python3.11-doc reStructuredText, held out by document), and a byte-level BPE tokenizer."""

from __future__ import annotations

import gzip
import hashlib
import re
from dataclasses import dataclass
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


# --- Documents: the study's corpus (Debian's linux-doc-6.1 and python3.11-doc reStructuredText) ---------

LINUX_DOC = Path("/usr/share/doc/linux-doc-6.1/Documentation")
PYTHON_DOC = Path("/usr/share/doc/python3.11/html/_sources")
DOC_SOURCES = {"linux-doc": (LINUX_DOC, "*.rst.gz", "linux-doc-6.1"), "python-doc": (PYTHON_DOC, "*.rst.txt", "python3.11-doc")}


@dataclass(frozen=True)
class Document:
    source: str  #: "linux-doc" or "python-doc"
    name: str  #: path relative to the source's root
    text: str


def load_documents(sources: tuple[str, ...] = ("linux-doc", "python-doc"), min_chars: int = 200) -> list[Document]:
    """Every reStructuredText document of the given sources (whitespace-normalised, sorted by name;
    documents shorter than ``min_chars`` dropped). Raises FileNotFoundError naming the Debian package
    when a source is missing (scripts/bootstrap.sh installs both)."""
    docs = []
    for source in sources:
        if source not in DOC_SOURCES:
            raise ValueError(f"sources: expected names from {sorted(DOC_SOURCES)}, got {source!r}")
        root, pattern, package = DOC_SOURCES[source]
        paths = sorted(root.rglob(pattern)) if root.is_dir() else []
        if not paths:
            raise FileNotFoundError(f"corpus: no {pattern} under {root}; install the Debian package {package}")
        for p in paths:
            raw = gzip.open(p, "rt", encoding="utf-8", errors="replace").read() if p.suffix == ".gz" else \
                p.read_text(encoding="utf-8", errors="replace")
            text = re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t]+", " ", raw)).strip()
            if len(text) >= min_chars:
                docs.append(Document(source, str(p.relative_to(root)), text))
    return docs


def split_documents(docs: list[Document], held_out_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, held_out), held out by whole document: a document is held out when a hash of its source and
    name falls in the lowest ``held_out_fraction`` of the hash range, so the split is stable when documents
    are added and no held-out document is seen in training (or by the tokenizer)."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction: must be in (0, 1), got {held_out_fraction}")
    train, held = [], []
    for d in docs:
        h = int.from_bytes(hashlib.sha256(f"{d.source}/{d.name}".encode()).digest()[:8], "big") / 2.0**64
        (held if h < held_out_fraction else train).append(d)
    return train, held


def tokenize_documents(vocab: int, tokenizer_chars: int, max_docs: int | None, cache_dir: Path,
                       held_out_fraction: float = 0.05):
    """The study's data: (tokenizer, train ids [N] int32, held-out ids [M] int32, counts). The documents
    are split by ``split_documents``; a byte-level BPE of ``vocab`` tokens is trained on the first
    ``tokenizer_chars`` characters of the train split; both are cached in ``cache_dir``. ``max_docs``
    keeps an evenly spaced subset (the quick configuration)."""
    import torch

    docs = load_documents()
    if max_docs is not None:
        docs = docs[:: max(1, len(docs) // max_docs)][:max_docs]
    train_docs, held_docs = split_documents(docs, held_out_fraction)
    train_text = "\n\n".join(d.text for d in train_docs)
    held_text = "\n\n".join(d.text for d in held_docs)
    tok = train_tokenizer(train_text[:tokenizer_chars], vocab, cache_dir)
    key = hashlib.sha256(f"{vocab}|{max_docs}|{tokenizer_chars}|{held_out_fraction}|{len(docs)}|{len(train_text)}".encode())
    path = cache_dir / f"tokens-{key.hexdigest()[:16]}.pt"
    if path.is_file():
        train_ids, held_ids = torch.load(path)
    else:
        print(f"[corpus] tokenizing {len(train_text) / 1e6:.1f}M train / {len(held_text) / 1e6:.1f}M held-out characters",
              flush=True)

        def encode(text: str) -> torch.Tensor:
            return torch.tensor([i for enc in tok.encode_batch(text.split("\n\n")) for i in enc.ids], dtype=torch.int32)

        train_ids, held_ids = encode(train_text), encode(held_text)
        cache_dir.mkdir(parents=True, exist_ok=True)
        torch.save((train_ids, held_ids), path)
    counts = {"documents_train": len(train_docs), "documents_held_out": len(held_docs),
              "tokens_train": int(train_ids.numel()), "tokens_held_out": int(held_ids.numel()),
              "sources": sorted({d.source for d in docs})}
    return tok, train_ids, held_ids, counts
