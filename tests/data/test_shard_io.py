"""Shard writing and reading: our writer, webdataset's TarWriter and plain tar all read back."""
import json
import os
import subprocess
import tarfile

import pytest
import webdataset

from internimage.data.faults import SkipCounter
from internimage.data.shards import (expand_shards, iter_samples, read_sample_counts,
                                     shard_sample_counts, split_member_name)
from internimage.data.writer import Sample, ShardWriter

from tests.data.data_cases import jpeg_bytes


def read_all(pattern: str) -> list:
    counter = SkipCounter()
    samples = [s for url in expand_shards(pattern) for s in iter_samples(url, counter)]
    assert counter.total() == 0
    return samples


def test_writer_round_trip_keeps_labels_captions_and_counts(tmp_path):
    images = {f"k{i}": jpeg_bytes(i) for i in range(7)}
    with ShardWriter(str(tmp_path), "train", max_samples=3) as writer:
        for i, (key, data) in enumerate(images.items()):
            writer.write(Sample(key, data, "jpg", label=i * 10,
                                caption=f"un chat numéro {i}" if i % 2 else None))
    assert writer.shards == {"train-000000.tar": 3, "train-000001.tar": 3, "train-000002.tar": 1}
    index = json.loads((tmp_path / "train-index.json").read_text())
    assert index == {"shards": writer.shards, "total": 7}

    samples = read_all(writer.pattern())
    assert [s.key for s in samples] == list(images)
    for i, sample in enumerate(samples):
        assert sample.members["jpg"] == images[sample.key]
        assert sample.members["cls"] == str(i * 10).encode()
        assert ("txt" in sample.members) == bool(i % 2)
    assert samples[1].members["txt"].decode("utf-8") == "un chat numéro 1"
    assert read_sample_counts(expand_shards(writer.pattern())) == {
        str(tmp_path / name): count for name, count in writer.shards.items()}


def test_writer_starts_a_new_shard_at_max_bytes(tmp_path):
    data = os.urandom(50_000)  # the writer stores bytes as they are; headers are small beside
    with ShardWriter(str(tmp_path), "train", max_samples=100, max_bytes=175_000) as writer:
        for i in range(7):
            writer.write(Sample(f"k{i}", data, "jpg", label=0))
    assert list(writer.shards.values()) == [3, 3, 1]


def test_webdataset_tarwriter_shards_read_back(tmp_path):
    path = str(tmp_path / "wds-000000.tar")
    with webdataset.TarWriter(path) as sink:
        for i in range(5):
            sink.write({"__key__": f"sample{i:03d}", "jpg": jpeg_bytes(i), "cls": i,
                        "txt": f"caption {i}", "json": {"caption": f"caption {i}"}})
    samples = read_all(path)
    assert [s.key for s in samples] == [f"sample{i:03d}" for i in range(5)]
    assert [int(s.members["cls"]) for s in samples] == list(range(5))
    assert [s.members["txt"].decode() for s in samples] == [f"caption {i}" for i in range(5)]
    assert all(s.members["jpg"] == jpeg_bytes(i) for i, s in enumerate(samples))


def test_plain_tar_of_a_folder_reads_back_with_directory_keys(tmp_path):
    folder = tmp_path / "images" / "part0"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"{i:05d}.jpg").write_bytes(jpeg_bytes(i))
        (folder / f"{i:05d}.txt").write_text(f"a photo {i}")
    shard = tmp_path / "plain-000000.tar"
    subprocess.run(["tar", "--sort=name", "-cf", str(shard), "-C", str(tmp_path), "images"], check=True)
    samples = read_all(str(shard))
    assert [s.key for s in samples] == [f"images/part0/{i:05d}" for i in range(3)]
    assert [s.members["txt"] for s in samples] == [f"a photo {i}".encode() for i in range(3)]


def test_pipe_command_and_gzip_shards_read_back(tmp_path):
    with ShardWriter(str(tmp_path), "train", max_samples=10) as writer:
        for i in range(4):
            writer.write(Sample(f"k{i}", jpeg_bytes(i), "jpg", label=i))
    plain = tmp_path / "train-000000.tar"
    gz = tmp_path / "gz-000000.tar.gz"
    with tarfile.open(gz, "w:gz") as out, tarfile.open(plain) as source:
        for member in source:
            out.addfile(member, source.extractfile(member))
    assert [s.key for s in read_all(f"pipe:cat {plain}")] == ["k0", "k1", "k2", "k3"]
    assert [s.key for s in read_all(str(gz))] == ["k0", "k1", "k2", "k3"]
    assert shard_sample_counts([f"pipe:cat {plain}"]) == {f"pipe:cat {plain}": 4}


def test_only_image_text_class_and_json_members_are_kept(tmp_path):
    shard = tmp_path / "x-000000.tar"
    with webdataset.TarWriter(str(shard), encoder=False) as sink:
        sink.write({"__key__": "a", "jpg": b"jpegbytes", "pyd": b"\x80\x04pickle", "pth": b"x",
                    "cls": b"3", "json": b"{}"})
    (sample,) = read_all(str(shard))
    assert set(sample.members) == {"jpg", "cls", "json"}


@pytest.mark.parametrize("pattern", ["d/a-{000000..000011}.tar", "x{1..12}y", "{a,b,c}-{09..11}",
                                     "plain.tar", "p-{0..3}/{x,y}.tar"])
def test_brace_expansion_agrees_with_the_braceexpand_package(pattern):
    braceexpand = pytest.importorskip("braceexpand")
    assert expand_shards(pattern) == list(braceexpand.braceexpand(pattern))


def test_brace_patterns_and_member_names():
    assert expand_shards("/d/a-{000..002}.tar::/e/b.tar") == [
        "/d/a-000.tar", "/d/a-001.tar", "/d/a-002.tar", "/e/b.tar"]
    assert split_member_name("dir/0001.seg.JPG") == ("dir/0001", "seg.jpg")
    assert split_member_name("0001.cls") == ("0001", "cls")


def test_missing_index_falls_back_to_counting(tmp_path):
    with ShardWriter(str(tmp_path), "train", max_samples=2) as writer:
        for i in range(5):
            writer.write(Sample(f"k{i}", jpeg_bytes(i), "jpg", label=i))
    os.remove(tmp_path / "train-index.json")
    urls = expand_shards(writer.pattern())
    assert read_sample_counts(urls) is None
    assert list(shard_sample_counts(urls).values()) == [2, 2, 1]


def test_writer_rejects_prefix_with_dash(tmp_path):
    with pytest.raises(ValueError, match="prefix"):
        ShardWriter(str(tmp_path), "in-22k")


def test_a_source_reads_the_member_keys_it_names(tmp_path):
    from internimage.data import SourceConfig, build_train_loader
    from tests.data.data_cases import small_config, take, write_tar

    members = []
    for i in range(6):  # open_clip-style custom keys, plus a .txt that must not be used
        members += [(f"k{i}.photo", jpeg_bytes(i)), (f"k{i}.caption.txt", f"cat {i}".encode()),
                    (f"k{i}.txt", b"ignored")]
    shard = write_tar(str(tmp_path / "custom-000000.tar"), members)
    source = SourceConfig("laion", shard, kind="caption", image_keys=["photo"],
                          caption_keys=["caption.txt"])
    cfg = small_config([source], epoch_samples=6, context_length=8)
    loader = build_train_loader(cfg, 0, 1)
    (batch,) = take(loader, 1)
    assert loader.skip_counts()["missing_key"] == 0
    texts = {bytes(t - 3 for t in row[1:6]).decode() for row in batch["text"].tolist()}
    assert texts <= {f"cat {i}" for i in range(6)}


def test_member_keys_are_validated_before_any_work():
    from internimage.data import DataConfig, SourceConfig

    cfg = DataConfig(train_sources=[SourceConfig("a", "x.tar", image_keys=[".jpg"])])
    with pytest.raises(ValueError, match=r"image_keys=\['.jpg'\] must list member extensions"):
        cfg.validate()


def img2dataset_layout(folder, sizes: list[int]) -> str:
    """Shards named as img2dataset writes them (00000.tar, ...) with their 00000_stats.json."""
    for shard, size in enumerate(sizes):
        with webdataset.TarWriter(str(folder / f"{shard:05d}.tar")) as sink:
            for i in range(size):
                sink.write({"__key__": f"{shard:05d}{i:04d}", "jpg": jpeg_bytes(i), "cls": i,
                            "txt": f"caption {i}"})
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps(
            {"count": size + 3, "successes": size, "failed_to_download": 3}))
    return str(folder / f"{{00000..{len(sizes) - 1:05d}}}.tar")


def test_img2dataset_stats_and_open_clip_sizes_set_the_epoch_length(tmp_path):
    from internimage.data import SourceConfig, build_train_loader
    from tests.data.data_cases import small_config

    (tmp_path / "a").mkdir()
    pattern = img2dataset_layout(tmp_path / "a", [3, 5])
    assert read_sample_counts(expand_shards(pattern)) == {
        str(tmp_path / "a" / "00000.tar"): 3, str(tmp_path / "a" / "00001.tar"): 5}
    cfg = small_config([SourceConfig("laion", pattern, kind="caption")], epoch_samples=0,
                       batch_size=2)
    assert build_train_loader(cfg, 0, 1).steps_per_epoch == 4

    (tmp_path / "b").mkdir()
    pattern = img2dataset_layout(tmp_path / "b", [2, 2])
    (tmp_path / "b" / "sizes.json").write_text(json.dumps({"00000.tar": 2, "00001.tar": 2}))
    for stats in (tmp_path / "b").glob("*_stats.json"):
        stats.unlink()
    assert list(read_sample_counts(expand_shards(pattern)).values()) == [2, 2]
    (tmp_path / "b" / "sizes.json").unlink()
    assert read_sample_counts(expand_shards(pattern)) is None
