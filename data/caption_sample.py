"""A look at the captions a run will tokenize, once at its start: how many tokens they take and how
many do not fit into the context. Cheap and bounded: the first captions of the first shards of each
caption source, read without their images."""
from __future__ import annotations

import dataclasses

from .config import DataConfig
from .decode import decode_caption
from .faults import SkipCounter
from .shards import expand_shards, iter_samples
from .sources import member_policy
from .tokenizer import Tokenizer

__all__ = ["caption_token_statistics", "first_captions"]

SAMPLE_CAPTIONS = 1000   # in all, shared between the caption sources
SAMPLE_SHARDS = 4        # at most this many shards opened per source (an empty or broken first one)


def first_captions(cfg: DataConfig, limit: int = SAMPLE_CAPTIONS, max_shards: int = SAMPLE_SHARDS) -> list[str]:
    """Up to ``limit`` captions, in shard order, from the caption sources of ``cfg`` (an equal share
    each); images and classes are not read. Unreadable shards and captions are passed over."""
    sources = [source for source in cfg.train_sources if source.kind == "caption"]
    captions: list[str] = []
    for number, source in enumerate(sources):
        share = (limit - len(captions)) // (len(sources) - number)
        policy = dataclasses.replace(member_policy(cfg, source), image_keys=(), class_keys=())
        counter = SkipCounter()
        taken = 0
        for url in expand_shards(source.shards)[:max_shards]:
            for sample in iter_samples(url, counter, policy):
                try:
                    caption = decode_caption(sample.members, policy.caption_keys)
                except ValueError:  # not UTF-8, bad JSON: the loader skips it too
                    continue
                if caption is not None:
                    captions.append(caption)
                    taken += 1
                if taken >= share:
                    break
            if taken >= share:
                break
    return captions


def caption_token_statistics(tokenizer: Tokenizer, captions: list[str]) -> dict[str, float]:
    """``captions`` (the number measured), ``mean_tokens`` (per caption, start and end token
    included, before the cut to the context) and ``truncated_share`` (the fraction longer than
    ``context_length``, cut); {} without captions."""
    if not captions:
        return {}
    lengths = [tokenizer.row_length(caption) for caption in captions]
    return {"captions": len(lengths), "mean_tokens": sum(lengths) / len(lengths),
            "truncated_share": sum(length > tokenizer.context_length for length in lengths) / len(lengths)}
