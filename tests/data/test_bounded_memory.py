"""Bounded memory: members over their cap are never read, captions are cut before tokenizing, a
shuffle chunk stops at its byte budget."""
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time

from internimage.data import Tokenizer
from internimage.data.faults import SkipCounter
from internimage.data.shards import iter_samples
from internimage.data.sources import SourceReader, SourceShards

from tests.data.data_cases import jpeg_bytes, write_caption_shards
from tests.paths import REPO

MEMORY_LIMIT = 1536 << 20  # address space of the whole process, torch included (~650 MiB)

BOMB_RUN = textwrap.dedent("""
    import json, resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]), int(sys.argv[2])))
    sys.path.insert(0, sys.argv[3])
    from internimage.data import SourceConfig, build_train_loader
    from tests.data.data_cases import small_config, take
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    cfg = small_config([SourceConfig("laion", sys.argv[1], kind="caption")], epoch_samples=8,
                       shuffle_buffer=9)
    loader = build_train_loader(cfg, 0, 1)
    take(loader, 1)
    print(json.dumps({"seconds": time.perf_counter() - started, "skips": loader.skip_counts(),
                      "grew_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
                      / 1024}))
""")


def write_gzip_bomb(path: str, text_bytes: int) -> None:
    """A .tar.gz of a few hundred KB: one sample whose .txt inflates to ``text_bytes``, then
    eight ordinary caption samples."""
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        members = [("bomb.jpg", jpeg_bytes(0)), ("bomb.txt", b"a " * (text_bytes // 2))]
        for i in range(8):
            members += [(f"k{i}.jpg", jpeg_bytes(i)), (f"k{i}.txt", f"photo {i}".encode())]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_gzip_bomb_caption_is_skipped_unread_under_a_memory_limit(tmp_path):
    shard = str(tmp_path / "bomb-000000.tar.gz")
    write_gzip_bomb(shard, 100 << 20)
    assert os.path.getsize(shard) < 1 << 20
    run = subprocess.run([sys.executable, "-c", BOMB_RUN, shard, str(MEMORY_LIMIT),
                          REPO], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["skips"]["oversized"] == 1
    assert result["grew_mib"] < 100 and result["seconds"] < 10, result


def test_members_over_their_cap_are_refused_by_extension(tmp_path):
    path = str(tmp_path / "caps-000000.tar")
    with tarfile.open(path, "w") as tar:
        for name, size in [("a.jpg", 2000), ("a.txt", 50), ("b.jpg", 50), ("b.txt", 2000)]:
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(b"x" * size))
    from internimage.data.shards import MemberPolicy

    policy = MemberPolicy(max_image_bytes=1000, max_text_bytes=100)
    samples = list(iter_samples(path, SkipCounter(), policy))
    assert [(s.key, sorted(s.members), s.oversized) for s in samples] == [
        ("a", ["txt"], ["jpg"]), ("b", ["jpg"], ["txt"])]


def test_captions_are_cut_before_tokenizing():
    tokenizer = Tokenizer(context_length=8)
    huge = "word " * 2_000_000  # 10 MB: normalising and encoding it whole took ~2 s
    started = time.perf_counter()
    tokens = tokenizer.encode_batch([huge])
    assert time.perf_counter() - started < 0.2
    assert tokens.tolist() == tokenizer.encode_batch(["word " * 10]).tolist()


def test_a_shuffle_chunk_ends_at_its_byte_budget(tmp_path):
    pattern = write_caption_shards(str(tmp_path), shards=1, per_shard=20)
    sample_bytes = len(jpeg_bytes(50000)) + 20
    source = SourceShards("laion", "caption", pattern, [pattern])  # one shard
    reader = SourceReader(source, [0], shuffle_buffer=1000, counter=SkipCounter(),
                          chunk_bytes=5 * sample_bytes)
    reader.next()
    assert 5 <= len(reader._chunk) <= 6  # stops at the first sample that reaches the budget
