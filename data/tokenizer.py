"""Offline caption tokenizers with a fixed context length.

``DataConfig.tokenizer`` names a vocabulary file, chosen by its name: ``*.txt.gz`` / ``*.txt`` is
CLIP's BPE merges file (``bpe_simple_vocab_16e6.txt.gz``, read by ``clip_bpe.py``; 5× fewer tokens
than bytes on English captions), ``*.json`` a HuggingFace ``tokenizers`` file. Without one, the built-in
byte-level tokenizer: UTF-8 bytes of the NFC-normalised, whitespace-collapsed caption (one token
per character of English, so 77 tokens hold about a dozen words); it needs no file, for the demo
and tests. Every row is framed by our start/end tokens.
"""
from __future__ import annotations

import os
import unicodedata

import torch

from .clip_bpe import ClipBPE

PAD_ID = 0          # 0 everywhere a row has no caption or the caption ended
START_ID = 1
END_ID = 2
BYTE_OFFSET = 3     # byte b has id b + 3; a vocabulary file's token t has id t + 3
# Captions are cut to this many characters per token of context before tokenizing: a token is
# at least one character, so no tokenizer's first context_length tokens lie beyond the cut (bar
# runs of whitespace), and a hostile 64 KiB caption costs microseconds, not a normalise pass.
CHARS_PER_TOKEN = 64


class Tokenizer:
    """``encode_batch(list[str]) -> int64 (B, context_length)``; ids < ``vocab_size``.

    Each row is [start, tokens..., end, 0, 0, ...]; a caption too long is cut so the end token
    still fits. An empty caption gives [start, end, 0, ...]; use ``None`` for 'no caption' (all 0).
    """

    def __init__(self, context_length: int = 77, path: str | None = None):
        if context_length < 2:
            raise ValueError(f"context_length={context_length} must be >= 2 (start + end token)")
        self.context_length = context_length
        self.path = path
        self.kind, self._vocabulary = _load_vocabulary(path) if path else ("bytes", None)
        if self.kind == "bytes":
            self.vocab_size = 256 + BYTE_OFFSET
        elif self.kind == "clip_bpe":
            self.vocab_size = self._vocabulary.vocab_size + BYTE_OFFSET
        else:
            self.vocab_size = self._vocabulary.get_vocab_size(with_added_tokens=True) + BYTE_OFFSET

    @classmethod
    def from_config(cls, cfg) -> "Tokenizer":
        """The tokenizer a ``DataConfig`` names (``context_length``, ``tokenizer``)."""
        return cls(cfg.context_length, cfg.tokenizer)

    def encode(self, text: str) -> list[int]:
        """Token ids of one caption without framing (ids 0..2 are the framing's: the vocabulary's
        are shifted by ``BYTE_OFFSET``)."""
        if self.kind == "clip_bpe":
            ids = self._vocabulary.encode(text)
        elif self.kind == "hf":
            ids = self._vocabulary.encode(text, add_special_tokens=False).ids
        else:
            ids = " ".join(unicodedata.normalize("NFC", text).split()).encode("utf-8")
        return [token + BYTE_OFFSET for token in ids]

    def row_length(self, text: str) -> int:
        """Tokens ``text`` needs with its start and end token, before any cut to the context."""
        return len(self.encode(text[: CHARS_PER_TOKEN * self.context_length])) + 2

    def encode_batch(self, texts: list[str | None]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.context_length, dtype=torch.int64)
        for row, text in enumerate(texts):
            if text is None:
                continue
            text = text[: CHARS_PER_TOKEN * self.context_length]
            ids = [START_ID] + self.encode(text)[: self.context_length - 2] + [END_ID]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out


WHERE_TO_GET_CLIP_BPE = (
    "CLIP's BPE file is bpe_simple_vocab_16e6.txt.gz, shipped inside the open_clip_torch wheel: "
    "pip download open_clip_torch --no-deps -d /tmp/oc && unzip -j /tmp/oc/open_clip_torch-*.whl "
    "open_clip/bpe_simple_vocab_16e6.txt.gz -d DIR")


def _load_vocabulary(path: str):
    """(kind, loaded vocabulary) of a tokenizer file, chosen by its name."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.tokenizer={path!r} does not exist. {WHERE_TO_GET_CLIP_BPE} "
                                "(or give a HuggingFace tokenizers .json file)")
    if path.endswith((".txt.gz", ".txt")):
        return "clip_bpe", ClipBPE(path)
    if path.endswith(".json"):
        return "hf", _load_hf_tokenizer(path)
    raise ValueError(f"data.tokenizer={path!r}: a tokenizer file is CLIP's BPE merges "
                     "(*.txt.gz or *.txt) or a HuggingFace tokenizers file (*.json)")


def _load_hf_tokenizer(path: str):
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError as error:
        raise ImportError(f"DataConfig.tokenizer={path!r} needs the 'tokenizers' package "
                          "(pip install tokenizers), or set it to null for the built-in "
                          "byte-level tokenizer") from error
    return HFTokenizer.from_file(path)
