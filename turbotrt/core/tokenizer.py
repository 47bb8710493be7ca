"""umT5 tokenizer as Wan calls it, without torch (the runtime imports this with numpy only).

Wan/TurboDiffusion call the Hugging Face `google/umt5-xxl` tokenizer with `clean="whitespace"`,
`padding="max_length"`, `truncation=True`, `max_length=512` and special tokens on. That amounts to:
1. clean: `ftfy.fix_text` (when ftfy is installed), `html.unescape` twice, strip, collapse runs of
   Unicode whitespace to one space, strip;
2. sentencepiece-encode, keep the first `text_len - 1` pieces and append EOS (`</s>`), as the HF T5
   tokenizer does (its truncation leaves room for the special token);
3. right-pad with id 0 (`<pad>`); mask is 1 on real tokens (EOS included), 0 on padding.

Without ftfy, mojibake is not repaired and curly quotes, ligatures and full-width forms are left as
they are (sentencepiece's own NFKC normalisation still folds the latter two), so such prompts can
tokenize differently from upstream; plain prompts are unaffected. `Tokenizer.fixes_text` says which.
"""

from __future__ import annotations

import html
import os
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

try:
    import ftfy
except ImportError:  # optional: see module docstring
    ftfy = None

try:  # upstream's `regex` \s is the Unicode White_Space set; spell it out when regex is absent
    import regex as _re

    _WHITESPACE = _re.compile(r"\s+")
except ImportError:
    _WHITESPACE = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")

PAD_ID = 0
SP_NAMES = ("spiece.model", "tokenizer.model")
JSON_NAME = "tokenizer.json"


def basic_clean(text: str) -> str:
    if ftfy is not None:
        text = ftfy.fix_text(text)
    # Twice, as upstream: prompts scraped from the web are often double-escaped (&amp;amp;).
    return html.unescape(html.unescape(text)).strip()


def whitespace_clean(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def clean_text(text: str) -> str:
    """Wan's `clean="whitespace"` preprocessing."""
    return whitespace_clean(basic_clean(text))


def pad_batch(seqs: Sequence[Sequence[int]], text_len: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Truncate each to `text_len - 1` ids, append EOS, right-pad with 0: int64 ids and mask."""
    ids = np.full((len(seqs), text_len), PAD_ID, dtype=np.int64)
    mask = np.zeros((len(seqs), text_len), dtype=np.int64)
    for i, seq in enumerate(seqs):
        row = list(seq[: text_len - 1]) + [eos_id]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def _resolve(path: Path) -> Path:
    if path.is_dir():
        for name in (*SP_NAMES, JSON_NAME):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no tokenizer in {path}: expected one of {', '.join((*SP_NAMES, JSON_NAME))}")
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file not found: {path} (a sentencepiece .model such as google/umt5-xxl's "
            f"spiece.model, or a {JSON_NAME})"
        )
    return path


class _SentencePiece:
    def __init__(self, path: Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.eos_id = self.sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"{path}: sentencepiece model defines no EOS piece")
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)


class _HFTokenizers:
    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError:
            raise ImportError(
                f"{path} is a Hugging Face tokenizer.json, which needs the `tokenizers` package "
                f"(pip install tokenizers); or pass the sentencepiece spiece.model instead"
            ) from None
        self.tok = _Tok.from_file(str(path))
        eos = self.tok.token_to_id("</s>")
        if eos is None:
            raise ValueError(f"{path}: no '</s>' token")
        self.eos_id = eos
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        # Special tokens are added by pad_batch, identically for both back ends.
        return self.tok.encode(text, add_special_tokens=False).ids


class Tokenizer:
    """`Tokenizer(path, text_len=512)(texts) -> (ids int64 [B, text_len], mask int64 [B, text_len])`.

    `path`: a sentencepiece `.model`, a `tokenizer.json`, or a directory holding one (the
    sentencepiece file is preferred: it needs no extra package).
    """

    def __init__(self, path: str | os.PathLike, text_len: int = 512):
        if text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {text_len}")
        self.path = _resolve(Path(path))
        self.text_len = text_len
        self._impl = _HFTokenizers(self.path) if self.path.suffix == ".json" else _SentencePiece(self.path)
        self.eos_id = self._impl.eos_id
        self.pad_id = PAD_ID
        self.vocab_size = self._impl.vocab_size
        self.fixes_text = ftfy is not None
        if not self.fixes_text:
            warnings.warn("ftfy is not installed: prompts are not ftfy-fixed before tokenizing", stacklevel=2)

    def encode(self, text: str) -> list[int]:
        """Cleaned, unpadded ids without EOS."""
        return self._impl.encode(clean_text(text))

    def __call__(self, texts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, str):
            texts = [texts]
        return pad_batch([self.encode(t) for t in texts], self.text_len, self.eos_id)


def make_tiny_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 256, seed: int = 0) -> Path:
    """Train a small sentencepiece model on a generated corpus: the tokenizer of the tiny presets.

    The same seed gives the same model file, so built-in tiny bundles are reproducible. Special ids
    follow umT5's: <pad>=0, </s>=1, <unk>=2, no BOS.
    """
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = ("a cat dog bird fish tree river city night day sun moon red blue green walks runs flies "
             "swims over under through the slowly quickly bright dark camera pans zooms video of in").split()
    syllables = [c + v for c in "bdgklmnprstvz" for v in "aeiou"]
    words += ["".join(rng.choice(syllables, size=int(rng.integers(1, 4)))) for _ in range(300)]
    lines = [" ".join(rng.choice(words, size=int(rng.integers(3, 12)))) for _ in range(500)]
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "spiece"), vocab_size=vocab_size, model_type="unigram",
        pad_id=PAD_ID, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, minloglevel=2,
    )
    corpus.unlink()
    (out / "spiece.vocab").unlink(missing_ok=True)
    return out / "spiece.model"
