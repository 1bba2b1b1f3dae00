"""The shard plan at cluster scale, computed without reading any data: LAION-5B-sized (231,000
shards) and ImageNet-22K-sized (4,096 shards) sources over 1,024 ranks x 8 workers."""
import pickle
import time
from collections import defaultdict

import pytest

from internimage.data import SourceConfig, build_train_loader
from internimage.data import opener, shards
from internimage.data.shards import expand_shards
from internimage.data.sources import worker_assignment
from internimage.data.stream import Layout, SlotBuilder, TrainStream

from tests.data.data_cases import small_config

RANKS, WORKERS = 1024, 8
LAION = "https://laion.example/laion5b-{000000..230999}.tar"
IN22K = "https://in22k.example/in22k-{0000..4095}.tar"


@pytest.mark.parametrize("pattern,shard_count", [(LAION, 231_000), (IN22K, 4_096)])
def test_every_sample_has_one_worker_per_pass_and_loads_differ_by_under_a_shard(pattern,
                                                                                shard_count):
    urls = expand_shards(pattern)
    assert len(urls) == shard_count
    workers = RANKS * WORKERS
    started = time.perf_counter()
    plans = [worker_assignment(urls, g, workers) for g in range(workers)]
    planning_s = time.perf_counter() - started
    phases_of_shard = defaultdict(list)
    for owned, stride, phase in plans:
        for url in owned:
            phases_of_shard[url].append((stride, phase))
    assert len(phases_of_shard) == shard_count  # every shard has a reader
    for sharers in phases_of_shard.values():  # ... and its samples split exactly: i mod k == j
        assert sorted(phase for _, phase in sharers) == list(range(sharers[0][0]))
        assert {stride for stride, _ in sharers} == {len(sharers)}
    loads = [len(owned) / stride for owned, stride, _ in plans]  # in shards per pass
    mean = shard_count / workers
    assert max(loads) - min(loads) <= 1 and all(abs(load - mean) <= 1 for load in loads)
    assert planning_s < 5, planning_s


def test_a_rank_plans_its_workers_without_reading_a_tar_and_its_state_is_small(monkeypatch):
    def no_reads(url, *args, **kwargs):
        raise AssertionError(f"planning opened {url}")
    monkeypatch.setattr(shards, "open_shard", no_reads)
    monkeypatch.setattr(opener, "open_shard", no_reads)
    cfg = small_config([SourceConfig("laion", LAION, 0.7, "caption"),
                        SourceConfig("in22k", IN22K, 0.3, "class")],
                       workers=WORKERS, epoch_samples=5_000_000_000, batch_size=64)
    started = time.perf_counter()
    loader = build_train_loader(cfg, RANKS - 1, RANKS)
    stream = TrainStream(cfg, loader.sources, loader.layout, 0, [None] * WORKERS)
    builders = [SlotBuilder(stream, slot) for slot in range(WORKERS)]
    for builder in builders:
        builder._start_segment(epoch=3, batch_number=3 * loader.steps_per_epoch)
    planning_s = time.perf_counter() - started
    assert planning_s < 10, planning_s
    assert isinstance(loader.layout, Layout) and loader.layout.global_workers == RANKS * WORKERS

    # The resume state of the rank, with positions as large as a long run makes them.
    for builder in builders:
        for reader in builder.readers:
            reader._cursor = [10**6, 230_999, 99_999, 10**12]
            reader._chunk_index = 10**9
    state = loader.state_dict()
    state["slot_states"] = [builder._state(10**9) for builder in builders]
    state_bytes = len(pickle.dumps(state))
    assert state_bytes < 8 << 10, state_bytes
