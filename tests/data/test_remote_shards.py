"""Remote shards through webdataset's opener (http, gs, s3, pipe:, local) with one failure
handling: stderr in the log, a read timeout, and no false alarm when we stop reading on purpose."""
import functools
import http.server
import logging
import os
import stat
import threading
import time

import pytest

from internimage.data import SourceConfig, build_train_loader
from internimage.data.faults import SkipCounter
from internimage.data.shards import iter_samples
from internimage.data.writer import Sample, ShardWriter

from tests.data.data_cases import small_config, take, write_class_shards


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    write_class_shards(str(root), shards=2, per_shard=5)
    return root


@pytest.fixture(scope="module")
def http_root(shard_dir):
    """http://127.0.0.1:PORT serving ``shard_dir``."""
    handler = functools.partial(QuietHandler, directory=str(shard_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def keys(url: str, counter: SkipCounter) -> list[str]:
    return [sample.key for sample in iter_samples(url, counter)]


def test_http_shards_read_back_and_a_url_pattern_is_not_a_missing_path(shard_dir, http_root):
    counter = SkipCounter()
    local = keys(str(shard_dir / "train-000000.tar"), counter)
    assert keys(f"{http_root}/train-000000.tar", counter) == local
    assert counter.total() == 0

    pattern = f"{http_root}/train-{{000000..000001}}.tar"
    cfg = small_config([SourceConfig("web", pattern)], epoch_samples=10, shuffle_buffer=10,
                       batch_size=5)
    loader = build_train_loader(cfg, 0, 1)
    labels = sorted(label for batch in take(loader, 2) for label in batch["label"].tolist())
    assert labels == [0] * 5 + [1] * 5 and loader.skip_counts()["open_failed"] == 0


def test_a_missing_http_shard_is_open_failed(http_root):
    counter = SkipCounter()
    assert keys(f"{http_root}/nothing-000000.tar", counter) == []
    assert counter.counts["open_failed"] == 1


def fake_command(folder, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("scheme,command", [("gs", "gsutil"), ("s3", "aws")])
def test_bucket_urls_go_through_the_cli_webdataset_names(tmp_path, shard_dir, monkeypatch,
                                                         scheme, command):
    # A stand-in CLI that streams the local shard, as `gsutil cat` / `aws s3 cp URL -` would.
    fake_command(tmp_path, command, f'for a; do last="$a"; done\n'
                                    f'[ "$last" = "-" ] || [ "$1" = "cat" ] || exit 9\n'
                                    f'cat {shard_dir}/train-000001.tar')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    counter = SkipCounter()
    assert keys(f"{scheme}://bucket/train-000001.tar", counter) == [
        f"s001_{i:04d}" for i in range(5)]
    assert counter.total() == 0


def test_a_failing_pipe_logs_its_stderr_and_exit_status(caplog):
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="internimage.data"):
        assert keys("pipe:echo 'bucket not found' >&2; exit 3", counter) == []
    assert counter.counts["open_failed"] == 1
    assert "exited with 3" in caplog.text and "bucket not found" in caplog.text


def test_a_stalled_pipe_times_out_instead_of_hanging(tmp_path):
    from internimage.data.shards import MemberPolicy

    counter = SkipCounter()
    started = time.perf_counter()
    samples = list(iter_samples("pipe:sleep 30", counter, MemberPolicy(read_timeout_s=0.5)))
    assert samples == [] and counter.counts["open_failed"] == 1
    assert time.perf_counter() - started < 5


def test_a_pipe_we_stop_reading_on_purpose_is_not_open_failed(tmp_path):
    # 2 MB: more than the pipe buffers and our read buffer, so the command is still writing
    # when we stop, and gets SIGPIPE (exit 141 through the shell pipeline).
    with ShardWriter(str(tmp_path), "big", max_samples=100) as writer:
        for i in range(40):
            writer.write(Sample(f"k{i:02d}", os.urandom(50_000), "jpg", label=i))
    counter = SkipCounter()
    samples = iter_samples(f"pipe:cat {tmp_path}/big-000000.tar | cat", counter)
    assert next(samples).key == "k00"
    samples.close()
    assert counter.total() == 0


@pytest.mark.parametrize("via", ["http", "pipe"])
def test_trailing_bytes_we_do_not_read_after_the_end_are_not_a_failure(shard_dir, http_root,
                                                                       via):
    # Tar writers pad archives to whole records; 3 MB of padding keeps the command writing after
    # we read the end blocks, so it gets EPIPE (curl: exit 23; cat through a shell: 141).
    padded = shard_dir / "padded-000000.tar"
    padded.write_bytes((shard_dir / "train-000000.tar").read_bytes() + bytes(3 << 20))
    url = f"{http_root}/padded-000000.tar" if via == "http" else f"pipe:cat {padded} | cat"
    counter = SkipCounter()
    assert len(keys(url, counter)) == 5
    assert counter.total() == 0
