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
    with pytest.raises(FileNotFoundError, match="data.tokenizer"):
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


def _caption_shards(out_dir, prefix, captions, per_shard):
    from internimage.data import Sample, ShardWriter
    with ShardWriter(str(out_dir), prefix, max_samples=per_shard) as writer:
        for index, caption in enumerate(captions):
            writer.write(Sample(f"{prefix}{index:04d}", b"\xff\xd8 not an image", "jpg", caption=caption))
    return f"{out_dir}/{prefix}-{{000000..{(len(captions) - 1) // per_shard:06d}}}.tar"


def test_caption_sample_is_bounded_shared_between_sources_and_measured_in_tokens(tmp_path):
    from internimage.data import DataConfig, SourceConfig
    from internimage.data.caption_sample import caption_token_statistics, first_captions
    a = _caption_shards(tmp_path, "a", [f"a{i}" for i in range(30)], per_shard=4)
    b = _caption_shards(tmp_path, "b", ["b" * (i % 8) for i in range(10)], per_shard=10)
    cfg = DataConfig(train_sources=[SourceConfig("a", a, kind="caption"), SourceConfig("b", b, kind="caption"),
                                    SourceConfig("k", "/nowhere-{0..9}.tar", kind="class")])
    of_b = ["b" * (i % 8) for i in range(10)]
    # at most 3 shards of "a" (12 captions) for its share of 10; "b" has 10 for the rest
    assert first_captions(cfg, limit=20, max_shards=3) == [f"a{i}" for i in range(10)] + of_b
    assert first_captions(cfg, limit=40, max_shards=2) == [f"a{i}" for i in range(8)] + of_b
    # the row of "b" * k needs k + 2 tokens: 2..9, of which 8 and 9 (k = 6, 7) exceed a context of 7
    stats = caption_token_statistics(Tokenizer(context_length=7), ["b" * k for k in range(8)])
    assert stats == {"captions": 8, "mean_tokens": (2 + 9) / 2, "truncated_share": 2 / 8}
    assert caption_token_statistics(Tokenizer(), []) == {}
