"""Evaluation of the contrastive objective: zero-shot classification and image↔text retrieval.

Known answers on constructed embeddings, retrieval against a brute-force ranking, and the whole
``Evaluator`` on the demo shards giving the same metrics on 2 ranks as on 1.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from internimage.data import SHIPPED_CLASS_LISTS, Tokenizer, load_class_names
from internimage.data.class_names import class_names_path
from internimage.data.demo import DIGIT_NAMES
from internimage.pretrain.config import ConfigError, load_config
from internimage.pretrain.evaluation import (RECALL_AT, Evaluator, class_embeddings, prompt_share,
                                             retrieval_hits, topk_hits)
from internimage.pretrain.finetuning import format_summary
from tests.pretrain.pretrain_helpers import REPO, free_port

DEMO_MIXED = os.path.join(REPO, "configs", "demo_mixed.yaml")


# -- class names ---------------------------------------------------------------------------------
def test_shipped_class_lists_have_their_sizes_and_first_synonyms():
    sizes = {name: len(load_class_names(name)) for name in SHIPPED_CLASS_LISTS}
    assert sizes == {"demo": 10, "imagenet1k": 1000, "imagenet22k": 21841}
    assert load_class_names("demo") == DIGIT_NAMES
    first = load_class_names("imagenet1k")[:3]
    assert first == ["tench", "goldfish", "great white shark"]  # "tench, Tinca tinca": the first synonym
    assert load_class_names("imagenet22k")[0] == "organism"


def test_a_class_names_file_is_read_and_an_empty_line_named(tmp_path):
    good = tmp_path / "names.txt"
    good.write_text("cat, house cat\ndog\n")
    assert load_class_names(str(good)) == ["cat", "dog"]
    bad = tmp_path / "bad.txt"
    bad.write_text("cat\n\ndog\n")
    with pytest.raises(ValueError, match="line 2 \\(class 1\\) holds no name"):
        load_class_names(str(bad))
    with pytest.raises(FileNotFoundError, match="not a shipped list"):
        class_names_path(str(tmp_path / "missing.txt"))


def test_eval_config_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="needs the text tower"):
        load_config(os.path.join(REPO, "configs", "demo.yaml"), ["eval.class_names=demo"])
    with pytest.raises(ConfigError, match="names 1000 classes but model.num_classes is 10"):
        load_config(DEMO_MIXED, ["eval.class_names=imagenet1k"])
    with pytest.raises(ConfigError, match="each holding '\\{\\}'"):
        load_config(DEMO_MIXED, ["eval.prompt_templates=[a photo]"])
    with pytest.raises(ConfigError, match="eval.class_names: .*no such file"):
        load_config(DEMO_MIXED, [f"eval.class_names={tmp_path}/none.txt"])


# -- zero-shot -----------------------------------------------------------------------------------
def _name_embedding_forward(names, tokenizer, templates):
    """A text tower that knows the answer: a prompt's embedding is the one-hot of its class."""
    table = {tuple(row.tolist()): index for index, name in enumerate(names)
             for row in tokenizer.encode_batch([t.replace("{}", name) for t in templates])}

    def forward(text):
        rows = [table.get(tuple(row.tolist())) for row in text]
        out = torch.zeros(len(rows), len(names))
        for i, index in enumerate(rows):
            if index is not None:
                out[i, index] = 3.0  # unnormalised on purpose
            else:  # padding rows: anything finite
                out[i] = 1.0
        return {"text_embedding": out}
    return forward


@pytest.mark.parametrize("world", [1, 3])
def test_zero_shot_picks_the_class_whose_prompts_match_the_image(world):
    names = ["zero", "one", "two", "three", "four", "five", "six"]
    templates = ["a photo of a {}.", "the {}"]
    tokenizer = Tokenizer(24)
    forward = _name_embedding_forward(names, tokenizer, templates)
    # Every rank embeds its share (the last padded); one process stands in for each rank here and
    # the shares are joined as the gather would (on one process gather_rows is the identity).
    shares = [prompt_share(names, templates, tokenizer, r, world) for r in range(world)]
    assert [s.shape for s in shares] == [(-(-7 // world), 2, 24)] * world
    parts = [class_embeddings(forward, share, share.shape[0], 2) for share in shares]
    classes = torch.cat(parts)[:len(names)]
    torch.testing.assert_close(classes, torch.eye(len(names)))
    labels = torch.tensor([0, 3, 6, 2, 5])
    valid = torch.tensor([True, True, True, True, False])
    right = F.one_hot(labels, len(names)).float()
    assert topk_hits(right @ classes.t(), labels, valid).tolist() == [4.0, 4.0, 4.0]
    # Each image closest to the next class, its own second: top-1 misses, top-5 hits.
    second = 0.6 * right + 0.8 * F.one_hot((labels + 1) % len(names), len(names)).float()
    assert topk_hits(second @ classes.t(), labels, valid).tolist() == [0.0, 4.0, 4.0]


# -- retrieval -----------------------------------------------------------------------------------
def _brute_force_recall(images, texts, groups, queries, ks):
    """Rank every candidate per query, ties ordered against the query; a hit at k when a pair of
    the query's group is among the first k. Image→text candidates: one text per distinct caption."""
    groups = groups.tolist()
    distinct = [groups.index(g) for g in sorted(set(groups))]
    hits = torch.zeros(2, len(ks))
    sides = ((images, distinct), (texts, list(range(len(groups)))))
    for direction, (query_side, candidates) in enumerate(sides):
        other = texts if direction == 0 else images
        for q in queries.tolist():
            scores = {j: float(query_side[q] @ other[j]) for j in candidates}
            order = sorted(candidates, key=lambda j: (-scores[j], groups[j] == groups[q]))
            first = next(i for i, j in enumerate(order) if groups[j] == groups[q])
            for i, k in enumerate(ks):
                hits[direction, i] += first < k
    return hits


@pytest.mark.parametrize("block_elements", [1, 50, 1 << 20])
def test_retrieval_hits_equal_a_brute_force_ranking(block_elements):
    g = torch.Generator().manual_seed(0)
    n, dim = 41, 8
    images = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    texts = F.normalize(images + 0.5 * torch.randn(n, dim, generator=g), dim=-1)
    groups = torch.arange(n)
    groups[[3, 17, 30]] = 3  # three pairs with one caption between them
    texts[[17, 30]] = texts[3].clone()
    queries = torch.tensor([0, 3, 5, 8, 11, 17, 22, 40])
    expected = _brute_force_recall(images, texts, groups, queries, RECALL_AT)
    ours = retrieval_hits(images, texts, groups, queries, block_elements=block_elements)
    assert ours.tolist() == expected.tolist()
    assert 0 < expected[:, 0].min() and expected[:, 0].sum() < expected[:, -1].sum() < 2 * len(queries)  # not trivial


def test_a_collapsed_embedding_scores_no_retrieval_hits():
    n = 30
    same = F.normalize(torch.ones(n, 4), dim=-1)
    hits = retrieval_hits(same, same, torch.arange(n), torch.arange(n))
    assert hits.sum().item() == 0.0


# -- the whole evaluator, 1 rank vs 2 ---------------------------------------------------------------
def _evaluate(rank, world, port, demo_data, results, *extra):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if world > 1:  # a spawned rank: one thread each on a shared machine
        torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from internimage.pretrain.engine import build_module
    cfg = load_config(DEMO_MIXED, [
        f"data.val_shards={demo_data}/classes/val-000000.tar",
        f"data.val_caption_shards={demo_data}/captions/val-000000.tar",
        f"data.train_sources.0.shards={demo_data}/classes/train-000000.tar",
        f"data.train_sources.1.shards={demo_data}/captions/train-000000.tar",
        "model.arch={channels: 8, depths: [1, 1, 1, 1], groups: [1, 1, 2, 2]}",
        "data.batch_size=48", "data.workers=0", "text.width=16", "objective.embed_dim=16", *extra])
    torch.manual_seed(0)
    module = build_module(cfg, Tokenizer.from_config(cfg.data).vocab_size).eval()
    evaluator = Evaluator(cfg, rank, world, torch.device("cpu"), torch.float32)

    results[rank] = evaluator.evaluate(lambda **inputs: module(evaluate=True, **inputs))
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_ranks_evaluate_exactly_what_one_rank_does(demo_data):
    results = mp.Manager().dict()
    _evaluate(0, 1, free_port(), demo_data, results)
    alone = results[0]
    mp.spawn(_evaluate, args=(2, free_port(), demo_data, results), nprocs=2)
    assert results[0] == results[1]
    expected_keys = {"top1", "top5", "samples", "zeroshot_top1", "zeroshot_top5", "zeroshot_samples",
                     "retrieval_pairs"} | {f"{d}_r{k}" for d in ("i2t", "t2i") for k in RECALL_AT}
    assert set(alone) == expected_keys
    assert alone["samples"] == alone["zeroshot_samples"] == alone["retrieval_pairs"] == 360
    for key, value in alone.items():
        assert results[0][key] == pytest.approx(value, abs=1e-9), key


def test_a_contrastive_run_evaluates_zero_shot_and_retrieval_without_a_head(demo_data):
    results = {}
    _evaluate(0, 1, free_port(), demo_data, results, "objective.kind=contrastive",
              f"data.train_sources=[{{name: c, shards: {demo_data}/captions/train-000000.tar, kind: caption}}]")
    assert "top1" not in results[0]
    assert results[0]["zeroshot_samples"] == results[0]["retrieval_pairs"] == 360
    assert 0.0 <= results[0]["zeroshot_top1"] <= results[0]["zeroshot_top5"] <= 1.0


# -- the fine-tuning summary -------------------------------------------------------------------------
def test_fine_tuning_summary_shows_contrastive_metrics_when_present():
    plain = {"stage": "a", "img_size": 32, "top1": 0.5, "top5": 0.9, "ema_top1": 0.6, "ema_top5": 0.95,
             "images_per_s": 10.0}
    assert "zero-shot" not in format_summary([plain])
    mixed = dict(plain, stage="b", zeroshot_top1=0.25, zeroshot_top5=0.75, ema_zeroshot_top1=0.3,
                 i2t_r1=0.125, t2i_r10=0.875, ema_i2t_r1=0.2)
    table = format_summary([plain, mixed])
    assert "zero-shot" in table and "25.00" in table and "12.50" in table and "87.50" in table
