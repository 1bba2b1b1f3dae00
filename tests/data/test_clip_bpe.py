"""CLIP's BPE tokenizer read from a merges file: byte symbols, word splitting, merge order, cleaning.

No download: the merges files are written here, and the expected ids follow from the format
(byte symbols 0..255 in vocabulary order, the same with </w> at 256..511, merge k at 512 + k).
"""
import gzip
import random
import time

import pytest

from internimage.data import Tokenizer
from internimage.data.clip_bpe import ClipBPE, _word_pattern, byte_symbols, read_merges

pytest.importorskip("ftfy")

MERGES = ["l o", "lo w", "e r</w>", "n e", "ne w", "new er</w>"]


def write_merges(path, merges, gz=True):
    text = "#version: 0.2\n" + "\n".join(merges) + "\n"
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def letter(c: str) -> int:
    """Vocabulary id of a printable ASCII symbol ('!' is 0)."""
    return ord(c) - ord("!")


def end(c: str) -> int:
    return 256 + letter(c)


@pytest.fixture
def bpe(tmp_path):
    return ClipBPE(write_merges(tmp_path / "bpe.txt.gz", MERGES))


def test_byte_symbols_are_printable_distinct_and_in_clips_vocabulary_order():
    by_byte, in_order = byte_symbols()
    assert len(set(by_byte)) == 256 and sorted(by_byte) == sorted(in_order)
    assert all(symbol.isprintable() and not symbol.isspace() for symbol in by_byte)
    assert in_order[:3] == ["!", '"', "#"] and by_byte[ord("a")] == "a"
    # the 68 bytes that are not printable Latin-1 follow, as chr(256 + n) in byte order
    assert in_order[188] == by_byte[0] == chr(256) and in_order[255] == by_byte[0xAD] == chr(256 + 67)
    assert by_byte[ord(" ")] == chr(256 + 32)


def test_merges_apply_lowest_rank_first_and_give_clip_ids(bpe):
    assert bpe.vocab_size == 512 + len(MERGES)
    assert bpe.encode("lower") == [512 + 1, 512 + 2]        # lo+w, e+r</w>: "low" "er</w>"
    assert bpe.encode("newer") == [512 + 5]                 # n e w er</w> -> ne w -> new -> newer</w>
    assert bpe.encode("LOWER, newer!") == [513, 514, end(","), 517, end("!")]
    assert bpe.encode("it's") == [letter("i"), end("t"), letter("'"), end("s")]
    assert bpe.encode("2024") == [end("2"), end("0"), end("2"), end("4")]  # one digit a word


def test_non_ascii_words_are_utf8_byte_symbols(bpe):
    # é is C3 A9: both printable Latin-1, vocabulary ids 94 + 12 + (0xC3 - 0xAE) and 94 + (0xA9 - 0xA1)
    assert bpe.encode("é") == [106 + 0xC3 - 0xAE, 256 + 94 + 0xA9 - 0xA1]
    assert len(bpe.encode("東京")) == 6  # letters: one word of six bytes


@pytest.mark.parametrize("text, words", [
    ("a photo of 3 cats", ["a", "photo", "of", "3", "cats"]),
    ("i'm sure they'll", ["i", "'m", "sure", "they", "'ll"]),
    ("naïve café", ["naïve", "café"]),
    ("x²½ⅻ", ["x", "²", "½", "ⅻ"]),                # No, No, Nl: numbers, one character each
    ("e\u0301 ok!!", ["e", "\u0301", "ok", "!!"]),  # a combining mark is neither letter nor number
    ("ªº_μ", ["ªº", "_", "μ"]),                     # Lo letters; the underscore is not a letter
    ("東京タワー 一二", ["東京タワー", "一二"]),   # CJK numerals are letters (Lo), not \\p{N}
    ("12 a1b", ["1", "2", "a", "1", "b"]),
])
def test_words_are_letter_runs_single_numbers_and_other_runs(text, words):
    assert _word_pattern().findall(text) == words


def test_captions_are_cleaned_as_clip_does(bpe):
    assert bpe.encode("don\u2019t &amp;amp; \n  lower") == bpe.encode("don't & lower")
    assert bpe.encode("  LoWeR\t") == bpe.encode("lower")


def naive_merge(word: str, ranks: dict) -> list[str]:
    """The definition: join the lowest-ranked adjacent pair at every place, left to right; repeat."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(ranks[p], p) for p in zip(symbols, symbols[1:]) if p in ranks]
        if not pairs:
            break
        first, second = min(pairs)[1]
        out, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                out.append(first + second)
                i += 2
            else:
                out.append(symbols[i])
                i += 1
        symbols = out
    return symbols


def test_merging_matches_the_definition_on_random_words(tmp_path):
    rng = random.Random(0)
    alphabet = "abc"
    merges, known = [], set(alphabet) | {c + "</w>" for c in alphabet}
    while len(merges) < 40:  # random merges of known symbols, some out of creation order
        first, second = rng.choice(sorted(known)), rng.choice(sorted(known))
        if first.endswith("</w>") or (first, second) in merges:
            continue
        merges.append((first, second))
        known.add(first + second)
    rng.shuffle(merges)
    bpe = ClipBPE(write_merges(tmp_path / "m.txt", [f"{a} {b}" for a, b in merges], gz=False))
    tokens = {index: token for token, index in bpe.ids.items()}
    ranks = {merge: rank for rank, merge in enumerate(merges)}
    for _ in range(400):
        word = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        assert [tokens[i] for i in bpe._merge_word(word)] == naive_merge(word, ranks), word


def test_a_hostile_long_word_costs_milliseconds(bpe):
    word = "lowernewer" * 500
    t0 = time.perf_counter()
    ids = bpe.encode(word)
    assert time.perf_counter() - t0 < 1.0
    tokens = {index: token for token, index in bpe.ids.items()}
    assert [tokens[i] for i in ids] == naive_merge(word, {tuple(m.split()): r for r, m in enumerate(MERGES)})


def test_tokenizer_file_kind_follows_the_name_and_rows_are_framed(tmp_path):
    path = write_merges(tmp_path / "bpe_simple_vocab_16e6.txt.gz", MERGES)
    tokenizer = Tokenizer(context_length=4, path=path)
    assert tokenizer.kind == "clip_bpe" and tokenizer.vocab_size == 512 + len(MERGES) + 3
    rows = tokenizer.encode_batch(["newer", "lower newer lower", None])
    assert rows.tolist() == [[1, 517 + 3, 2, 0], [1, 513 + 3, 514 + 3, 2], [0, 0, 0, 0]]
    assert tokenizer.row_length("lower newer lower") == 7
    assert Tokenizer(path=write_merges(tmp_path / "plain.txt", MERGES, gz=False)).kind == "clip_bpe"
    (tmp_path / "vocab.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"\*.txt.gz or \*.txt\) or a HuggingFace tokenizers file"):
        Tokenizer(path=str(tmp_path / "vocab.bin"))
    with pytest.raises(FileNotFoundError, match="open_clip_torch --no-deps"):
        Tokenizer(path=str(tmp_path / "missing.txt.gz"))


def test_a_malformed_merges_file_names_the_line(tmp_path):
    path = write_merges(tmp_path / "bad.txt", ["l o", "lo w extra"], gz=False)
    with pytest.raises(ValueError, match="line 3"):
        read_merges(path)
    assert read_merges(write_merges(tmp_path / "ok.txt", MERGES, gz=False), limit=2) == [("l", "o"), ("lo", "w")]
