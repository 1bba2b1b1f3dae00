"""Caption tokenizers: byte-level default and HF tokenizers JSON files."""
import pytest
import torch

from internimage.data import Tokenizer


def test_byte_level_rows_are_start_bytes_end_then_padding():
    ids = Tokenizer(context_length=8).encode_batch(["ab", None, "  a\n b  "])
    assert ids.dtype == torch.int64 and ids.shape == (3, 8)
    assert ids[0].tolist() == [1, 97 + 3, 98 + 3, 2, 0, 0, 0, 0]
    assert ids[1].tolist() == [0] * 8
    assert ids[2].tolist() == [1, 97 + 3, 32 + 3, 98 + 3, 2, 0, 0, 0]


def test_long_captions_are_cut_but_keep_the_end_token_and_unicode_stays_in_vocab():
    tokenizer = Tokenizer(context_length=6)
    ids = tokenizer.encode_batch(["a scan of the handwritten digit seven", "ünïcödé ✓"])
    assert ids[0].tolist() == [1] + [b + 3 for b in b"a sc"] + [2]
    assert int(ids.max()) < tokenizer.vocab_size == 259


def test_context_length_must_fit_the_framing():
    with pytest.raises(ValueError, match="context_length"):
        Tokenizer(context_length=1)


def test_missing_tokenizer_file_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="DataConfig.tokenizer"):
        Tokenizer(path=str(tmp_path / "nope.json"))


def test_hf_tokenizers_json_is_used_when_configured(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    model = tokenizers.models.WordLevel({"[UNK]": 0, "a": 1, "scan": 2, "seven": 3},
                                        unk_token="[UNK]")
    hf = tokenizers.Tokenizer(model)
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path = str(tmp_path / "tok.json")
    hf.save(path)
    tokenizer = Tokenizer(context_length=6, path=path)
    assert tokenizer.vocab_size == 4 + 3
    assert tokenizer.encode_batch(["a scan of seven"])[0].tolist() == [1, 4, 5, 3, 6, 2]
