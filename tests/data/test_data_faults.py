"""Bad data is skipped and counted per reason; data that is all bad stops with a clear error."""
import io
import logging
import os
import pickle
import tarfile

import pytest

from internimage.data import SourceConfig, build_train_loader
from internimage.data.faults import SkipCounter
from internimage.data.shards import iter_samples
from internimage.data.writer import Sample, ShardWriter

from tests.data.data_cases import jpeg_bytes, small_config, take


class WritesMarkerWhenUnpickled:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_faulty_shards(root, marker: str) -> dict:
    """A shard with one sample of each per-sample fault, a truncated tar, and a missing path."""
    good = jpeg_bytes(1)
    with ShardWriter(str(root), "bad", max_samples=100) as writer:
        writer.write(Sample("good0", good, "jpg", label=0))
        writer.write(Sample("corrupt", os.urandom(500), "jpg", label=91))
        writer.write(Sample("cut", good[: len(good) // 2], "jpg", label=92))
        writer.write(Sample("bad_cls", good, "jpg", label=None, caption=None))
        writer.write(Sample("good1", good, "jpg", label=5))
    # Add members the writer API does not produce: a class without image, a non-integer class,
    # and a pickle that would write the marker file if anything unpickled it.
    path = str(root / "odd-000000.tar")
    with tarfile.open(path, "w") as tar:
        for name, data in [("noimage.cls", b"3"), ("word.jpg", good), ("word.cls", b"seven"),
                           ("pickled.jpg", good), ("pickled.cls", b"94"),
                           ("big.jpg", good), ("big.cls", b"95" + b" " * (65 << 10)),
                           ("pickled.pyd", pickle.dumps(WritesMarkerWhenUnpickled(marker)))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with ShardWriter(str(root), "full", max_samples=100) as writer:
        for i in range(20):
            writer.write(Sample(f"k{i}", jpeg_bytes(i), "jpg", label=i % 10))
    full = root / "full-000000.tar"
    truncated = root / "cut-000000.tar"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2 + 100])
    return {"bad": str(root / "bad-000000.tar"), "odd": path, "truncated": str(truncated),
            "missing": str(root / "missing-000000.tar")}


def test_each_fault_kind_is_skipped_and_counted(tmp_path):
    marker = str(tmp_path / "unpickled")
    paths = write_faulty_shards(tmp_path, marker)
    pattern = "::".join(paths.values())
    cfg = small_config([SourceConfig("in22k", pattern)], epoch_samples=100, shuffle_buffer=4)
    loader = build_train_loader(cfg, 0, 1)
    labels = [label for batch in take(loader, 12) for label in batch["label"].tolist()]
    counts = loader.skip_counts()
    assert set(counts) == {"open_failed", "truncated_tar", "corrupt_image", "missing_key",
                           "bad_label", "oversized"}
    for reason, count in counts.items():
        assert count > 0, reason
    assert 91 not in labels and 92 not in labels  # random bytes, truncated JPEG
    assert 95 not in labels  # a .cls over max_text_kib is never read
    assert 94 in labels  # the sample beside the pickle is used; the pickle is not read
    assert not os.path.exists(marker), "shard content was unpickled"


def test_truncated_tar_keeps_the_complete_samples_before_the_cut(tmp_path):
    paths = write_faulty_shards(tmp_path, str(tmp_path / "m"))
    counter = SkipCounter()
    keys = [sample.key for sample in iter_samples(paths["truncated"], counter)]
    assert 0 < len(keys) < 20 and keys == [f"k{i}" for i in range(len(keys))]
    assert counter.counts["truncated_tar"] == 1

    counter = SkipCounter()
    assert list(iter_samples(paths["missing"], counter)) == []
    assert list(iter_samples("pipe:exit 3", counter)) == []
    assert counter.counts["open_failed"] == 2


def test_skip_logging_is_rate_limited(caplog):
    counter = SkipCounter(log_interval_s=3600)
    with caplog.at_level(logging.WARNING, logger="internimage.data"):
        for i in range(50):
            counter.skip("corrupt_image", f"shard:{i}")
    assert counter.counts["corrupt_image"] == 50
    assert len(caplog.records) == 1


def test_pattern_naming_no_file_fails_at_build_time(tmp_path):
    cfg = small_config([SourceConfig("in22k", str(tmp_path / "nope-{000..009}.tar"))],
                       epoch_samples=10)
    with pytest.raises(FileNotFoundError, match=r"nope-\{000\.\.009\}\.tar.*none exists"):
        build_train_loader(cfg, 0, 1)


def test_shards_that_are_not_tars_stop_with_the_pattern_and_what_was_found(tmp_path):
    for i in range(2):
        (tmp_path / f"junk-{i}.tar").write_bytes(os.urandom(3000))
    pattern = str(tmp_path / "junk-{0..1}.tar")
    cfg = small_config([SourceConfig("laion", pattern, kind="caption")], epoch_samples=10)
    with pytest.raises(RuntimeError, match=r"no sample could be read.*junk-\{0\.\.1\}\.tar.*"
                                           r"open_failed"):
        take(build_train_loader(cfg, 0, 1), 1)


def test_shards_without_the_expected_labels_stop_with_a_hint(tmp_path):
    with ShardWriter(str(tmp_path), "train", max_samples=200) as writer:
        for i in range(150):
            writer.write(Sample(f"k{i}", jpeg_bytes(i), "jpg", label=1))
    cfg = small_config([SourceConfig("laion", writer.pattern(), kind="caption")],
                       shuffle_buffer=1)
    with pytest.raises(RuntimeError, match=r"'laion': 100 of the last 100 samples.*"
                                           r"failed to decode.*missing_key.*\.txt"):
        take(build_train_loader(cfg, 0, 1), 1)


def test_a_tar_cut_inside_its_first_member_counts_as_truncated_not_unopenable(tmp_path):
    with ShardWriter(str(tmp_path), "one", max_samples=10) as writer:
        writer.write(Sample("k0", jpeg_bytes(0), "jpg", label=0))
    full = tmp_path / "one-000000.tar"
    cut = tmp_path / "cut-000000.tar"
    cut.write_bytes(full.read_bytes()[:700])  # the first header, then part of its data
    counter = SkipCounter()
    assert list(iter_samples(str(cut), counter)) == []
    assert counter.counts["truncated_tar"] == 1 and counter.counts["open_failed"] == 0


def test_a_cut_shard_keeps_every_sample_complete_before_the_cut(tmp_path):
    with ShardWriter(str(tmp_path), "full", max_samples=100) as writer:
        for i in range(10):
            writer.write(Sample(f"k{i}", jpeg_bytes(i), "jpg", label=i))
    full = tmp_path / "full-000000.tar"
    with tarfile.open(full) as tar:
        offsets = {member.name: (member.offset, member.offset_data) for member in tar}
    data = full.read_bytes()

    cut_in_header = tmp_path / "a-000000.tar"  # k5 is complete, k6's first header is cut
    cut_in_header.write_bytes(data[: offsets["k6.jpg"][0] + 100])
    counter = SkipCounter()
    samples = list(iter_samples(str(cut_in_header), counter))
    assert [s.key for s in samples] == [f"k{i}" for i in range(6)]
    assert all(set(s.members) == {"jpg", "cls"} for s in samples)
    assert counter.counts["truncated_tar"] == 1 and counter.total() == 1

    cut_in_label = tmp_path / "b-000000.tar"  # k6's image is complete, its .cls is cut
    cut_in_label.write_bytes(data[: offsets["k6.cls"][0] + 200])  # inside its header
    samples = list(iter_samples(str(cut_in_label), SkipCounter()))
    assert [s.key for s in samples] == [f"k{i}" for i in range(7)]
    assert set(samples[-1].members) == {"jpg"}  # then a missing_key in the loader
