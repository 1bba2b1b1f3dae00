"""Training stream: node/worker split, weighted mixing, virtual epochs, exact resume."""
import io
import os

import pytest
import torch

from internimage.data import SourceConfig, build_train_loader
from internimage.data.sources import worker_assignment, worker_shards

from tests.data.data_cases import small_config, take, write_caption_shards, write_class_shards


@pytest.fixture(scope="module")
def eight_shards(tmp_path_factory):
    """8 class shards of 6 samples; every sample's label is its shard number."""
    return write_class_shards(str(tmp_path_factory.mktemp("eight")), shards=8, per_shard=6)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    classes = write_class_shards(str(root / "cls"), shards=3, per_shard=10)
    captions = write_caption_shards(str(root / "cap"), shards=3, per_shard=10)
    return classes, captions


def test_worker_split_is_disjoint_and_covers_every_shard():
    urls = [f"s{i}" for i in range(10)]
    parts = [worker_shards(urls, g, 4) for g in range(4)]
    assert sorted(sum(parts, [])) == sorted(urls)
    assert all(len(p) >= 2 for p in parts)
    # Fewer shards than workers: each worker shares one shard, keeping every k-th sample.
    assert worker_assignment(urls[:3], 5, 8) == ([urls[2]], 2, 1)  # shard 2: workers 2 and 5
    assert worker_assignment(urls[:3], 0, 8) == ([urls[0]], 3, 0)  # shard 0: workers 0, 3, 6


def test_two_ranks_of_two_workers_read_disjoint_shards_covering_all(eight_shards):
    cfg = small_config([SourceConfig("in22k", eight_shards)], workers=2, randaugment=False)
    seen_by_global_worker = {}
    for rank in range(2):
        loader = build_train_loader(cfg, rank, world_size=2)
        for number, batch in enumerate(take(loader, 12)):
            global_worker = rank * 2 + number % 2  # batch n of a rank comes from slot n mod 2
            seen_by_global_worker.setdefault(global_worker, set()).update(batch["label"].tolist())
    for global_worker, shards in seen_by_global_worker.items():
        assert shards == {s for s in range(8) if s % 4 == global_worker}
    assert set().union(*seen_by_global_worker.values()) == set(range(8))


def test_batches_have_the_contract_shapes_and_types(two_sources):
    classes, captions = two_sources
    cfg = small_config([SourceConfig("cls", classes, 1.0, "class"),
                        SourceConfig("cap", captions, 1.0, "caption")], context_length=12)
    (batch,) = take(build_train_loader(cfg, 0, 1), 1)
    assert set(batch) == {"image", "label", "text", "source"}
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 3, 16, 16)
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (4,)
    assert batch["text"].dtype == torch.int64 and batch["text"].shape == (4, 12)
    assert batch["source"].dtype == torch.int64
    is_caption = batch["source"] == 1
    assert (batch["label"][is_caption] == -1).all()
    assert (batch["label"][~is_caption] >= 0).all()
    assert (batch["text"][~is_caption] == 0).all()
    assert (batch["text"][is_caption, 0] == 1).all()  # start token


def test_sources_are_mixed_by_weight(two_sources):
    classes, captions = two_sources
    cfg = small_config([SourceConfig("cls", classes, 0.25, "class"),
                        SourceConfig("cap", captions, 0.75, "caption")],
                       img_size=8, batch_size=50, randaugment=False, reprob=0.0)
    sources = torch.cat([b["source"] for b in take(build_train_loader(cfg, 0, 1), 16)])
    share = (sources == 0).float().mean().item()
    # 800 draws: the binomial standard deviation of the share is 0.015; allow 4 of them.
    assert abs(share - 0.25) < 0.06


def test_virtual_epoch_sets_equal_steps_on_every_rank(eight_shards):
    cfg = small_config([SourceConfig("in22k", eight_shards)])
    loaders = [build_train_loader(cfg, rank, 3) for rank in range(3)]
    assert {loader.steps_per_epoch for loader in loaders} == {48 // (4 * 3)}
    cfg.epoch_samples = 1000
    assert build_train_loader(cfg, 0, 3).steps_per_epoch == 1000 // 12


def _resume_case(cfg, rank, world_size, before, after):
    straight = take(build_train_loader(cfg, rank, world_size), before + after)
    first = build_train_loader(cfg, rank, world_size)
    take(first, before)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = take(build_train_loader(cfg, rank, world_size, state=state), after)
    for expected, got in zip(straight[before:], resumed):
        for key in expected:
            assert torch.equal(expected[key], got[key]), key
    return first


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_identical_batches(two_sources, workers):
    classes, captions = two_sources
    # 5 steps per epoch so the run crosses epoch boundaries; buffer 7 so chunks end mid-shard.
    cfg = small_config([SourceConfig("cls", classes, 0.4, "class"),
                        SourceConfig("cap", captions, 0.6, "caption")],
                       workers=workers, shuffle_buffer=7, epoch_samples=40, batch_size=8)
    _resume_case(cfg, rank=1, world_size=2, before=3, after=6)
    _resume_case(cfg, rank=0, world_size=1, before=7, after=4)


def test_resume_at_another_world_size_continues_from_the_sample_count(eight_shards):
    cfg = small_config([SourceConfig("in22k", eight_shards)], epoch_samples=48)
    first = build_train_loader(cfg, 0, 2)
    take(first, 5)  # 5 batches x 4 x 2 ranks = 40 samples
    moved = build_train_loader(cfg, 0, 4, state=first.state_dict())
    assert moved.batches == 40 // (4 * 4)
    assert moved.epoch == 2 // moved.steps_per_epoch
    assert len(take(moved, 2)) == 2


def test_runs_are_deterministic_and_seed_dependent(eight_shards):
    cfg = small_config([SourceConfig("in22k", eight_shards)])
    a = take(build_train_loader(cfg, 0, 1), 3)
    b = take(build_train_loader(cfg, 0, 1), 3)
    cfg.seed = 2
    c = take(build_train_loader(cfg, 0, 1), 3)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(a, c))


def test_epochs_differ_and_every_epoch_visits_all_shards(eight_shards):
    cfg = small_config([SourceConfig("in22k", eight_shards)], shuffle_buffer=48, batch_size=6)
    loader = build_train_loader(cfg, 0, 1)  # 8 steps per epoch = one pass over the 48 samples
    batches = take(loader, 16)
    first = torch.cat([b["label"] for b in batches[:8]])
    second = torch.cat([b["label"] for b in batches[8:]])
    assert sorted(first.tolist()) == sorted(second.tolist()) == sorted(list(range(8)) * 6)
    assert not torch.equal(first, second)


def test_a_second_for_loop_continues_the_same_stream(eight_shards):
    cfg = small_config([SourceConfig("in22k", eight_shards)], workers=1)
    loader = build_train_loader(cfg, 0, 1)
    pieces = take(loader, 2) + take(loader, 2)
    straight = take(build_train_loader(cfg, 0, 1), 4)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(pieces, straight))
    assert loader.batches == 4


def test_resume_at_another_layout_is_deterministic(eight_shards):
    cfg = small_config([SourceConfig("in22k", eight_shards)], epoch_samples=48, workers=1)
    first = build_train_loader(cfg, 0, 2)
    take(first, 3)
    state = first.state_dict()
    cfg.workers = 2
    runs = [take(build_train_loader(cfg, 1, 3, state=state), 3) for _ in range(2)]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(*runs))


def test_fewer_shards_than_workers_still_feeds_every_rank(tmp_path):
    pattern = write_class_shards(str(tmp_path), shards=1, per_shard=5)
    cfg = small_config([SourceConfig("in22k", pattern)], workers=2, epoch_samples=64)
    loaders = [build_train_loader(cfg, rank, 2) for rank in range(2)]
    assert {loader.steps_per_epoch for loader in loaders} == {8}
    for loader in loaders:
        assert len(take(loader, 10)) == 10  # crosses an epoch end on both workers


class CountingFile:
    """A shard file that counts the bytes read through it."""

    read_bytes = 0

    def __init__(self, path, mode="rb", buffering=-1):
        self.file = open(path, mode, buffering=buffering)

    def read(self, count=-1):
        data = self.file.read(count)
        CountingFile.read_bytes += len(data)
        return data

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        return self.file.seek(offset, whence)

    def close(self):
        self.file.close()


def test_a_restore_re_reads_one_chunk_not_the_shard_before_it(tmp_path, monkeypatch):
    from internimage.data import opener, shards
    from internimage.data.faults import SkipCounter
    from internimage.data.sources import SourceReader, SourceShards

    pattern = write_class_shards(str(tmp_path), shards=1, per_shard=200)
    source = SourceShards("in22k", "class", pattern, [pattern])
    reader = SourceReader(source, [0], shuffle_buffer=10, counter=SkipCounter())
    for _ in range(155):  # into chunk 15, 150 samples past the shard's start
        reader.next()
    state = reader.state()
    expected = [reader.next().key for _ in range(20)]

    for module in (opener, shards):
        monkeypatch.setattr(module, "open", CountingFile, raising=False)
    CountingFile.read_bytes = 0
    restored = SourceReader(source, [0], shuffle_buffer=10, counter=SkipCounter(), state=state)
    sample_bytes = os.path.getsize(pattern) / 200
    assert CountingFile.read_bytes < 12 * sample_bytes  # one chunk of 10, not 150 samples
    assert [restored.next().key for _ in range(20)] == expected


@pytest.mark.parametrize("stream_kind", ["pipe", "gzip"])
def test_a_restore_of_a_stream_or_compressed_shard_reads_up_to_the_chunk(tmp_path, stream_kind):
    import gzip

    from internimage.data.faults import SkipCounter
    from internimage.data.sources import SourceReader, SourceShards

    pattern = write_class_shards(str(tmp_path), shards=1, per_shard=60)
    if stream_kind == "pipe":
        url = f"pipe:cat {pattern}"
    else:
        url = pattern + ".gz"
        with open(url, "wb") as handle:
            handle.write(gzip.compress(open(pattern, "rb").read()))
    source = SourceShards("in22k", "class", url, [url])
    reader = SourceReader(source, [0], shuffle_buffer=7, counter=SkipCounter())
    for _ in range(31):
        reader.next()
    state = reader.state()
    # Neither can seek (a pipe; offsets inside gzip are not file offsets): read and skip.
    expected = [reader.next().key for _ in range(40)]  # crosses into the next pass
    restored = SourceReader(source, [0], shuffle_buffer=7, counter=SkipCounter(), state=state)
    assert [restored.next().key for _ in range(40)] == expected
