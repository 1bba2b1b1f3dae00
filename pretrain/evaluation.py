"""Evaluation on the validation shards: what the head and the text tower have learnt.

- ``data.val_shards`` (classified samples): top-1/top-5 of the head (supervised, mixed) and, with
  the text tower and ``eval.class_names``, zero-shot top-1/top-5: each image is given the class
  whose prompt embedding (the mean over ``eval.prompt_templates``) is closest to its own.
- ``data.val_caption_shards`` (image-text pairs; contrastive, mixed): retrieval recall R@1/5/10,
  image→text and text→image, over all pairs of the shards.

Every rank evaluates its share of the shards (``build_eval_loader``: each sample once, equal batch
counts) and embeds its share of the classes; counts are summed and embeddings gathered through
``distributed.py``. Every rank runs the same sequence of module forwards, as ZeRO-3's parameter
gathering requires. Metric names: ``top1``, ``top5``, ``samples``, ``zeroshot_top1``,
``zeroshot_top5``, ``zeroshot_samples``, ``i2t_r{1,5,10}``, ``t2i_r{1,5,10}``, ``retrieval_pairs``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from internimage.data import Tokenizer, build_eval_loader, load_class_names
from internimage.data.device import normalise

from .config import PretrainConfig
from .distributed import gather_rows, sum_over_ranks

__all__ = ["CONTRASTIVE_METRICS", "Evaluator", "RECALL_AT", "class_embeddings", "prompt_share", "retrieval_hits",
           "topk_hits"]

RECALL_AT = (1, 5, 10)
# The metrics of the text tower, in the order tables show them (EMA: with the prefix "ema_").
CONTRASTIVE_METRICS = ("zeroshot_top1", "zeroshot_top5",
                       *(f"{side}_r{k}" for side in ("i2t", "t2i") for k in RECALL_AT))
# Query rows × candidates of one block of the retrieval similarity matrix (256 MiB of fp32 scores).
SIMILARITY_BLOCK_ELEMENTS = 1 << 26

# Runs the trained module with evaluate=True on keyword inputs (image=..., text=...).
Forward = Callable[..., dict]


def topk_hits(scores: Tensor, labels: Tensor, valid: Tensor) -> Tensor:
    """(3,) fp32 on the scores' device: [top-1 hits, top-5 hits, valid rows] of one batch.

    scores (B, C) any float dtype; labels (B,) int64 in [0, C) where ``valid``; valid bool (B,).
    Top-5 is top-min(5, C)."""
    top = scores.float().topk(min(5, scores.shape[1]), dim=1).indices
    hit = (top == labels[:, None]) & valid[:, None]
    return torch.stack([hit[:, 0].sum(), hit.any(1).sum(), valid.sum()]).float()


def prompt_share(names: list[str], templates: list[str], tokenizer: Tokenizer, rank: int, world: int) -> Tensor:
    """int64 (P, T, L): rank ``rank``'s classes [r·P, (r+1)·P) of P = ceil(C / world), each name in
    every template ("{}" → name) and tokenised; rows past the last class are zeros (padding), so
    every rank holds P rows and only its share of the C · T prompts."""
    share = -(-len(names) // world)
    mine = names[rank * share:(rank + 1) * share]
    texts = [template.replace("{}", name) for name in mine for template in templates]
    tokens = tokenizer.encode_batch(texts)
    tokens = tokens.view(len(mine), len(templates), tokens.shape[-1])
    return torch.cat([tokens, tokens.new_zeros(share - len(mine), *tokens.shape[1:])])


def class_embeddings(forward: Forward, share: Tensor, count: int, classes_per_forward: int) -> Tensor:
    """(count, E) fp32, L2-normalised: each class's mean normalised text embedding over its prompts.

    share: this rank's ``prompt_share`` (P, T, L) on the compute device; it is embedded in forwards
    of ``classes_per_forward`` × T prompts (the same number on every rank), then every rank's rows
    are gathered (world · P × E floats on every rank) and the padding dropped."""
    classes, templates, length = share.shape
    parts = []
    for start in range(0, classes, classes_per_forward):
        chunk = share[start:start + classes_per_forward]
        embedded = forward(text=chunk.reshape(-1, length))["text_embedding"].float()
        mean = F.normalize(embedded, dim=-1).view(chunk.shape[0], templates, -1).mean(1)
        parts.append(F.normalize(mean, dim=-1))
    return gather_rows(torch.cat(parts))[:count]


def retrieval_hits(images: Tensor, texts: Tensor, groups: Tensor, queries: Tensor,
                   ks: tuple[int, ...] = RECALL_AT, block_elements: int = SIMILARITY_BLOCK_ELEMENTS) -> Tensor:
    """(2, len(ks)) fp32 hit counts of ``queries`` at each k: row 0 image→text, row 1 text→image.

    images, texts: (N, E) L2-normalised fp32, pair i = (images[i], texts[i]). groups: (N,) int64,
    equal for pairs whose captions are identical token for token. Identical captions cannot be
    told apart, so they are one caption: image→text ranks the distinct captions (the first pair's
    embedding of each), and text→image counts every image of the query's caption as correct.
    queries: int64 (Q,), the pair indices asked about. A query scores a hit at k when fewer than
    k wrong candidates score at least as high as its best correct one (ties count against it, so
    a collapsed embedding scores no hits).

    Memory beyond the inputs: one block of q × N scores and two q × N bool masks, with
    q = max(1, block_elements // N): about 6 · block_elements bytes (384 MiB by default), whatever N.
    """
    distinct, inverse = torch.unique(groups, return_inverse=True)
    first = torch.full((distinct.shape[0],), groups.shape[0], device=groups.device, dtype=torch.int64)
    first = first.scatter_reduce(0, inverse, torch.arange(groups.shape[0], device=groups.device), "amin")
    ks_tensor = torch.tensor(ks, device=images.device)
    hits = torch.zeros(2, len(ks), device=images.device)
    sides = ((images, texts[first], groups[first]), (texts, images, groups))
    for direction, (query_side, candidates, candidate_groups) in enumerate(sides):
        step = max(1, block_elements // max(1, candidates.shape[0]))
        for start in range(0, queries.shape[0], step):
            rows = queries[start:start + step]
            scores = query_side[rows] @ candidates.t()
            correct = groups[rows, None] == candidate_groups[None, :]
            best = scores.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)
            rank = ((scores >= best) & ~correct).sum(dim=1)
            hits[direction] += (rank[:, None] < ks_tensor).sum(dim=0)
    return hits


class Evaluator:
    """One run's evaluation: ``evaluate(forward)`` returns the metrics of the module ``forward``
    runs (collective: every rank calls it). This rank's share of the class prompts is tokenised
    once, here."""

    def __init__(self, cfg: PretrainConfig, rank: int, world: int, device: torch.device, dtype: torch.dtype):
        self.cfg, self.rank, self.world, self.device, self.dtype = cfg, rank, world, device, dtype
        self.supervised = cfg.objective.kind in ("supervised", "mixed")
        self.contrastive = cfg.objective.kind in ("contrastive", "mixed")
        self.prompts, self.num_named = None, 0
        if self.contrastive and cfg.eval.class_names is not None:
            names = load_class_names(cfg.eval.class_names)
            self.num_named = len(names)
            self.prompts = prompt_share(names, cfg.eval.prompt_templates, Tokenizer.from_config(cfg.data),
                                        rank, world).to(device)

    @property
    def classifies(self) -> bool:
        return bool(self.cfg.data.val_shards) and (self.supervised or self.prompts is not None)

    @property
    def retrieves(self) -> bool:
        return bool(self.cfg.data.val_caption_shards) and self.contrastive

    @property
    def enabled(self) -> bool:
        return self.classifies or self.retrieves

    @torch.no_grad()
    def evaluate(self, forward: Forward) -> dict[str, float]:
        result: dict[str, float] = {}
        if self.classifies:
            result.update(self._classification(forward))
        if self.retrieves:
            result.update(self._retrieval(forward))
        return result

    def _batches(self, shards: str, num_classes: int | None, max_batches: int | None):
        """This rank's validation batches of ``shards`` on the device, images normalised."""
        data = dataclasses.replace(self.cfg.data, val_shards=shards)
        for index, batch in enumerate(build_eval_loader(data, self.rank, self.world, num_classes=num_classes)):
            if max_batches is not None and index >= max_batches:
                break
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            batch["image"] = normalise(batch["image"]).to(self.dtype)
            yield batch

    def _classification(self, forward: Forward) -> dict[str, float]:
        """Top-1/top-5 of the head and/or zero-shot on data.val_shards."""
        classes = None
        if self.prompts is not None:
            classes = class_embeddings(forward, self.prompts, self.num_named, max(1, self.cfg.data.batch_size))
        # Labels must index the head (supervised) or the names (zero-shot); mixed: both (config check).
        num_classes = self.cfg.model.num_classes if self.supervised else self.num_named
        head = torch.zeros(3, device=self.device)
        zero_shot = torch.zeros(3, device=self.device)
        for batch in self._batches(self.cfg.data.val_shards, num_classes, self.cfg.eval.max_batches):
            out = forward(image=batch["image"])
            valid = batch["valid"] & (batch["label"] >= 0)
            if self.supervised:
                head += topk_hits(out["logits"], batch["label"], valid)
            if classes is not None:
                image = F.normalize(out["image_embedding"].float(), dim=-1)
                zero_shot += topk_hits(image @ classes.t(), batch["label"], valid)
        totals = sum_over_ranks(torch.cat([head, zero_shot]).tolist())
        result = {}
        for prefix, (top1, top5, samples), used in (("", totals[:3], self.supervised),
                                                     ("zeroshot_", totals[3:], classes is not None)):
            if used:
                result.update({f"{prefix}top1": top1 / max(1.0, samples), f"{prefix}top5": top5 / max(1.0, samples),
                               f"{prefix}samples": int(samples)})
        return result

    def _retrieval(self, forward: Forward) -> dict[str, float]:
        """R@1/5/10 both ways over every pair of data.val_caption_shards (no max_batches: the
        recall depends on how many candidates there are). Every rank holds all N pairs' embeddings
        (2·N·E fp32) and the tokens (N·L int64), and asks about its own pairs."""
        images, texts, tokens, valid = [], [], [], []
        for batch in self._batches(self.cfg.data.val_caption_shards, None, None):
            out = forward(image=batch["image"], text=batch["text"])
            images.append(F.normalize(out["image_embedding"].float(), dim=-1))
            texts.append(F.normalize(out["text_embedding"].float(), dim=-1))
            tokens.append(batch["text"])
            valid.append(batch["valid"] & (batch["text"] != 0).any(dim=1))
        local = torch.cat(valid).shape[0]  # the same on every rank (equal batch counts and sizes)
        images, texts, tokens, valid = (gather_rows(torch.cat(t)) for t in (images, texts, tokens, valid))
        groups = torch.unique(tokens, dim=0, return_inverse=True)[1]
        mine = torch.zeros_like(valid)
        mine[self.rank * local:(self.rank + 1) * local] = True
        position = torch.cumsum(valid, dim=0) - 1  # of each valid pair among the valid pairs
        queries = position[valid & mine]
        hits = retrieval_hits(images[valid], texts[valid], groups[valid], queries)
        *counts, pairs = sum_over_ranks(hits.flatten().tolist() + [float(queries.shape[0])])
        result = {f"{side}_r{k}": counts[d * len(RECALL_AT) + i] / max(1.0, pairs)
                  for d, side in enumerate(("i2t", "t2i")) for i, k in enumerate(RECALL_AT)}
        result["retrieval_pairs"] = int(pairs)
        return result

