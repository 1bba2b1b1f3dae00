"""Offline caption tokenizers with a fixed context length.

The built-in one is byte-level: UTF-8 bytes of the NFC-normalised, whitespace-collapsed caption,
framed by start/end tokens. It needs no vocabulary file, so image-text pretraining runs anywhere;
a HuggingFace ``tokenizers`` JSON file can replace it for a real text tower.
"""
from __future__ import annotations

import os
import unicodedata

import torch

PAD_ID = 0          # 0 everywhere a row has no caption or the caption ended
START_ID = 1
END_ID = 2
BYTE_OFFSET = 3     # byte b has id b + 3
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
        self._hf = _load_hf_tokenizer(path) if path else None
        if self._hf is None:
            self.vocab_size = 256 + BYTE_OFFSET
        else:
            # Reserve ids 0..2 of our framing by shifting the HF ids.
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True) + BYTE_OFFSET

    @classmethod
    def from_config(cls, cfg) -> "Tokenizer":
        """The tokenizer a ``DataConfig`` names (``context_length``, ``tokenizer``)."""
        return cls(cfg.context_length, cfg.tokenizer)

    def encode(self, text: str) -> list[int]:
        """Token ids of one caption without framing."""
        if self._hf is not None:
            return [token + BYTE_OFFSET for token in
                    self._hf.encode(text, add_special_tokens=False).ids]
        normal = " ".join(unicodedata.normalize("NFC", text).split())
        return [byte + BYTE_OFFSET for byte in normal.encode("utf-8")]

    def encode_batch(self, texts: list[str | None]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.context_length, dtype=torch.int64)
        for row, text in enumerate(texts):
            if text is None:
                continue
            text = text[: CHARS_PER_TOKEN * self.context_length]
            ids = [START_ID] + self.encode(text)[: self.context_length - 2] + [END_ID]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out


def _load_hf_tokenizer(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file {path!r} does not exist; set DataConfig.tokenizer "
                                "to a HuggingFace tokenizers JSON file or to null for the "
                                "built-in byte-level tokenizer")
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError as error:
        raise ImportError(f"DataConfig.tokenizer={path!r} needs the 'tokenizers' package "
                          "(pip install tokenizers), or set it to null for the built-in "
                          "byte-level tokenizer") from error
    return HFTokenizer.from_file(path)
