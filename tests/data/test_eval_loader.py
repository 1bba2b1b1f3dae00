"""Eval loader: every sample exactly once over all ranks, the same batch count on every rank."""
import os

import pytest
import torch

from internimage.data import SourceConfig, build_eval_loader
from internimage.data.writer import Sample, ShardWriter

from tests.data.data_cases import jpeg_bytes, small_config


@pytest.fixture(scope="module")
def val_pattern(tmp_path_factory):
    """21 samples in shards of 7, 5 and 9; the class of sample i is i."""
    root = tmp_path_factory.mktemp("val")
    sizes, label = [7, 5, 9], 0
    for shard, size in enumerate(sizes):
        with ShardWriter(str(root / f"part{shard}"), "val", max_samples=100) as writer:
            for _ in range(size):
                writer.write(Sample(f"v{label:03d}", jpeg_bytes(label), "jpg", label=label))
                label += 1
    return "::".join(str(root / f"part{shard}" / "val-000000.tar") for shard in range(3))


def run_ranks(pattern, world_size, workers, batch_size=4):
    cfg = small_config([SourceConfig("x", pattern)], val_shards=pattern, workers=workers,
                       batch_size=batch_size)
    per_rank = []
    for rank in range(world_size):
        loader = build_eval_loader(cfg, rank, world_size)
        batches = list(loader)
        assert len(batches) == len(loader)
        per_rank.append(batches)
    return per_rank


@pytest.mark.parametrize("world_size,workers", [(1, 0), (2, 2), (3, 0), (4, 1)])
def test_each_sample_once_and_equal_batch_counts(val_pattern, world_size, workers):
    per_rank = run_ranks(val_pattern, world_size, workers)
    assert len({len(batches) for batches in per_rank}) == 1
    seen = []
    for batches in per_rank:
        for batch in batches:
            assert batch["image"].shape == (4, 3, 16, 16) and batch["valid"].dtype == torch.bool
            seen += batch["label"][batch["valid"]].tolist()
            assert (batch["label"][~batch["valid"]] == -1).all()
    assert sorted(seen) == list(range(21))


def test_more_ranks_than_samples_still_gives_every_rank_batches(val_pattern):
    per_rank = run_ranks(val_pattern, world_size=24, workers=0, batch_size=2)
    assert {len(batches) for batches in per_rank} == {1}
    assert sum(int(b["valid"].sum()) for batches in per_rank for b in batches) == 21


def test_shards_without_index_and_corrupt_samples_keep_counts(tmp_path):
    with ShardWriter(str(tmp_path), "val", max_samples=100) as writer:
        for i in range(6):
            image = jpeg_bytes(i) if i != 2 else os.urandom(300)
            writer.write(Sample(f"k{i}", image, "jpg", label=i))
    os.remove(tmp_path / "val-index.json")
    per_rank = run_ranks(str(tmp_path / "val-000000.tar"), world_size=2, workers=0)
    valid = [label for batches in per_rank for b in batches for label in b["label"][b["valid"]].tolist()]
    assert sorted(valid) == [0, 1, 3, 4, 5]
    assert {len(batches) for batches in per_rank} == {1}
