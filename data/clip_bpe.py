"""CLIP's byte-level BPE tokenizer, read from its merges file (``bpe_simple_vocab_16e6.txt.gz``).

Written from the format, not from CLIP's code: every UTF-8 byte is a symbol (printable Latin-1
bytes stand for themselves, the others for ``chr(256 + n)``, so no symbol is whitespace or a
control character); a word's last symbol carries the end-of-word marker ``</w>``; the file's merges
join two adjacent symbols, the lower line first. Token ids are CLIP's: the 256 byte symbols, the
same with ``</w>``, then one token per merge, in file order. CLIP's start/end-of-text tokens (the
two ids after the merges) are not produced here: ``tokenizer.Tokenizer`` frames rows with its own.

Text is cleaned as CLIP does before splitting into words: ``ftfy.fix_text`` (mojibake, curly
quotes, NFC), HTML entities unescaped twice, whitespace collapsed, lower-cased. Words are runs of
letters, single digits, runs of other non-space characters, and the English contractions. Unlike
CLIP, the text ``<start_of_text>`` in a caption is words, not a control token.
"""
from __future__ import annotations

import functools
import gzip
import heapq
import html
import re
import unicodedata

__all__ = ["ClipBPE", "CLIP_MERGES", "END_OF_WORD", "read_merges"]

# CLIP's vocabulary is 49,408 tokens: 512 byte symbols, these many merges, start and end of text.
CLIP_MERGES = 49152 - 256 - 2
END_OF_WORD = "</w>"
# Distinct words whose tokens are remembered, per tokenizer (captions repeat most words).
CACHE_WORDS = 1 << 16
# Unicode letters and numbers all lie in planes 0-3 (4-13 are unassigned, 14 holds tags and
# variation selectors, 15-16 private use), so scanning them is enough and 4× faster than all.
_LAST_CLASSIFIED = 0x3FFFF


def byte_symbols() -> tuple[list[str], list[str]]:
    """(symbol of byte b at index b, the 256 symbols in vocabulary order).

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') are their own character; the 68 others
    become chr(256), chr(257), ... in byte order. The vocabulary lists the printable ones first.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    symbol = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
    return [symbol[b] for b in range(256)], [symbol[b] for b in printable + others]


def read_merges(path: str, limit: int = CLIP_MERGES) -> list[tuple[str, str]]:
    """The first ``limit`` merges of a CLIP BPE file (gzipped or plain text): after one header
    line, one merge per line, two symbols separated by a space. ValueError names a bad line."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    body = lines[1: limit + 1]
    while body and not body[-1].strip():  # a final newline
        body.pop()
    merges = []
    for number, line in enumerate(body, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"tokenizer file {path}, line {number}: expected a merge (two symbols "
                             f"separated by a space), got {line[:80]!r}; is this CLIP's "
                             "bpe_simple_vocab_16e6.txt.gz?")
        merges.append((parts[0], parts[1]))
    if not merges:
        raise ValueError(f"tokenizer file {path} holds no merges")
    return merges


@functools.cache
def _word_pattern() -> re.Pattern:
    """CLIP's word splitting: contractions, runs of letters (Unicode L*), one number character
    (N*), runs of anything else but whitespace. Python's ``re`` has no \\p{L}: the classes are
    built from the Unicode database once per process (~0.1 s)."""
    letters, numbers = [], []
    for code in range(_LAST_CLASSIFIED + 1):
        major = unicodedata.category(chr(code))[0]
        if major == "L":
            letters.append(code)
        elif major == "N":
            numbers.append(code)
    letter, number = _character_class(letters), _character_class(numbers)
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d|[{letter}]+|[{number}]|[^\s{letter}{number}]+", re.IGNORECASE)


def _character_class(codes: list[int]) -> str:
    """Sorted code points → the inside of a regex character class, as ranges."""
    parts, start = [], codes[0]
    for previous, code in zip(codes, codes[1:] + [-1]):
        if code != previous + 1:
            parts.append(re.escape(chr(start)) if start == previous else
                         f"{re.escape(chr(start))}-{re.escape(chr(previous))}")
            start = code
    return "".join(parts)


def clean(text: str) -> str:
    """CLIP's caption cleaning: ftfy, HTML entities (twice: captions are often escaped twice),
    whitespace collapsed to single spaces, lower case."""
    try:
        import ftfy
    except ImportError as error:
        raise ImportError("the CLIP BPE tokenizer cleans captions with ftfy: pip install ftfy") from error
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class ClipBPE:
    """``encode(text) -> list[int]``: CLIP's token ids of one caption, without start/end tokens.

    ``vocab_size``: the ids ``encode`` can return are below it (512 + merges). Words are merged in
    O(n log n) of their length (a hostile 5,000-letter word costs milliseconds) and the last
    ``CACHE_WORDS`` distinct words are remembered.
    """

    def __init__(self, path: str, max_merges: int = CLIP_MERGES):
        merges = read_merges(path, max_merges)
        self.path = path
        self.byte_symbol, base = byte_symbols()
        tokens = base + [symbol + END_OF_WORD for symbol in base] + ["".join(merge) for merge in merges]
        self.ids = {token: index for index, token in enumerate(tokens)}
        self.vocab_size = len(tokens)
        self.ranks = {merge: rank for rank, merge in enumerate(merges)}
        self._word_ids = functools.lru_cache(maxsize=CACHE_WORDS)(self._merge_word)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in _word_pattern().findall(clean(text)):
            ids.extend(self._word_ids("".join(self.byte_symbol[b] for b in word.encode("utf-8"))))
        return ids

    def _merge_word(self, word: str) -> tuple[int, ...]:
        """The token ids of one word of byte symbols.

        Round after round, the adjacent pair of lowest merge rank is joined at every place it
        occurs, left to right, not overlapping. Symbols form a linked list; a heap holds (rank,
        position) of every pair formed, and an entry whose pair has changed since is skipped.
        Pairs formed in a round join the heap after it, so each round sees the word as it was
        when the round began.
        """
        symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
        following = list(range(1, len(symbols))) + [-1]
        preceding = list(range(-1, len(symbols) - 1))
        heap = [(rank, i) for i in range(len(symbols) - 1)
                if (rank := self.ranks.get((symbols[i], symbols[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            rank = heap[0][0]
            formed = []
            while heap and heap[0][0] == rank:
                _, i = heapq.heappop(heap)
                j = following[i]
                if symbols[i] is None or j < 0 or self.ranks.get((symbols[i], symbols[j])) != rank:
                    continue  # consumed by an earlier merge of this round, or no longer this pair
                symbols[i] += symbols[j]
                symbols[j] = None
                following[i] = following[j]
                if following[j] >= 0:
                    preceding[following[j]] = i
                formed += [i] if preceding[i] < 0 else [preceding[i], i]
            for p in formed:
                q = following[p]
                pair_rank = self.ranks.get((symbols[p], symbols[q])) if q >= 0 else None
                if pair_rank is not None:
                    heapq.heappush(heap, (pair_rank, p))
        return tuple(self.ids[symbol] for symbol in symbols if symbol is not None)
