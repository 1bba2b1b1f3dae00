"""Shards written by strangers: whatever one sample holds, it is skipped and counted, never fatal;
only the image decoders we mean ever see member bytes."""
import io
import os
import stat

import pytest
from PIL import EpsImagePlugin, Image

from internimage.data import SourceConfig, build_eval_loader, build_train_loader
from internimage.data.decode import EncodedImage

from tests.data.data_cases import class_members, jpeg_bytes, small_config, take, write_tar

BEYOND_INT64 = b"99999999999999999999999"


def test_a_deeply_nested_json_caption_is_a_bad_label_not_a_dead_worker(tmp_path):
    members = [("deep.jpg", jpeg_bytes(0)), ("deep.json", b"[" * 60_000)]
    for i in range(6):
        members += [(f"k{i}.jpg", jpeg_bytes(i)), (f"k{i}.txt", f"a photo {i}".encode())]
    shard = write_tar(str(tmp_path / "cap-000000.tar"), members)
    cfg = small_config([SourceConfig("laion", shard, kind="caption")], epoch_samples=8,
                       shuffle_buffer=7)
    loader = build_train_loader(cfg, 0, 1)
    take(loader, 3)
    assert loader.skip_counts()["bad_label"] >= 1


def test_a_class_id_beyond_int64_is_a_bad_label_in_train_and_an_invalid_row_in_eval(tmp_path):
    members = class_members("huge", BEYOND_INT64) + class_members("neg", b"-3")
    for i in range(6):
        members += class_members(f"k{i}", i, seed=i)
    shard = write_tar(str(tmp_path / "cls-000000.tar"), members)
    cfg = small_config([SourceConfig("in22k", shard)], epoch_samples=8, shuffle_buffer=8,
                       val_shards=shard)
    loader = build_train_loader(cfg, 0, 1)
    labels = [label for batch in take(loader, 3) for label in batch["label"].tolist()]
    assert set(labels) <= set(range(6)) and loader.skip_counts()["bad_label"] >= 2

    batches = list(build_eval_loader(cfg, 0, 1))
    valid = [label for b in batches for label in b["label"][b["valid"]].tolist()]
    assert valid == list(range(6))  # the two bad rows are invalid, not label -1


def test_a_class_id_outside_the_model_head_is_a_bad_label_not_a_crash(tmp_path):
    members = []
    for i in range(8):
        members += class_members(f"k{i}", i, seed=i)  # ids 0..7 for a 5-class head
    shard = write_tar(str(tmp_path / "cls-000000.tar"), members)
    cfg = small_config([SourceConfig("in22k", shard)], epoch_samples=8, val_shards=shard)
    loader = build_train_loader(cfg, 0, 1, num_classes=5)
    labels = [label for batch in take(loader, 4) for label in batch["label"].tolist()]
    assert set(labels) == set(range(5)) and loader.skip_counts()["bad_label"] > 0
    batches = list(build_eval_loader(cfg, 0, 1, num_classes=5))
    assert sorted(label for b in batches for label in b["label"][b["valid"]].tolist()) == \
        list(range(5))


def mostly_corrupt_shard(path: str, good_every: int) -> str:
    members = []
    for i in range(40):
        image = jpeg_bytes(i) if i % good_every == 0 else os.urandom(200)
        members += [(f"k{i:02d}.jpg", image), (f"k{i:02d}.cls", b"1")]
    return write_tar(path, members)


def test_a_source_failing_more_than_the_rate_stops_with_its_name_and_counts(tmp_path):
    shard = mostly_corrupt_shard(str(tmp_path / "bad-000000.tar"), good_every=4)  # 75 % bad
    cfg = small_config([SourceConfig("scraped", shard)], epoch_samples=40, failure_window=20,
                       max_failure_rate=0.5)
    with pytest.raises(RuntimeError, match=r"'scraped': 1\d of the last 20 samples.*"
                                           r"max_failure_rate=0.5.*corrupt_image"):
        take(build_train_loader(cfg, 0, 1), 8)
    cfg.max_failure_rate = 0.9
    assert len(take(build_train_loader(cfg, 0, 1), 8)) == 8


def eps_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buffer, format="EPS")
    return buffer.getvalue()


def test_eps_bytes_named_jpg_are_corrupt_and_ghostscript_is_never_run(tmp_path, monkeypatch):
    marker = tmp_path / "gs_ran"
    fake_gs = tmp_path / "bin" / "gs"
    fake_gs.parent.mkdir()
    fake_gs.write_text(f"#!/bin/sh\necho ran >> {marker}\nexit 1\n")
    fake_gs.chmod(fake_gs.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake_gs.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # as in a fresh worker process

    with pytest.raises(OSError):
        EncodedImage(eps_bytes()).decode_rgb()
    members = [("eps.jpg", eps_bytes()), ("eps.cls", b"1")]
    for i in range(4):
        members += class_members(f"k{i}", i, seed=i)
    shard = write_tar(str(tmp_path / "eps-000000.tar"), members)
    cfg = small_config([SourceConfig("in22k", shard)], epoch_samples=4, shuffle_buffer=5)
    loader = build_train_loader(cfg, 0, 1)
    take(loader, 2)
    assert loader.skip_counts()["corrupt_image"] >= 1
    assert not marker.exists(), "Ghostscript was run on shard bytes"
