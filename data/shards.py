"""Shard lists and raw tar reading.

A shard is a tar file in WebDataset layout: members ``{key}.{ext}`` grouped by key, consecutive.
Shards come as brace patterns, paths, or ``pipe:`` commands whose stdout is a tar. Reading never
interprets member content here; only members whose extension a ``MemberPolicy`` names are kept,
each up to its size cap, so pickles and other executable payloads in a shard are never even read
into memory, and a 100 MB ``.txt`` costs 1 MiB of buffer while it is skipped.
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field
from typing import Iterator

from .faults import OPEN_FAILED, TRUNCATED_TAR, SkipCounter
from .opener import is_local, open_shard
from .tar_stream import TarPosition, iter_tar_files

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CLASS_EXTENSIONS = ("cls",)
CAPTION_EXTENSIONS = ("txt", "json")  # a key ending in "json": the JSON's "caption" field
INDEX_SUFFIX = "-index.json"
DEFAULT_MAX_IMAGE_BYTES = 32 << 20
DEFAULT_MAX_TEXT_BYTES = 64 << 10


@dataclass(frozen=True)
class MemberPolicy:
    """Which members of a sample are read (by extension, e.g. ``jpg`` or ``seg.png``), and at
    most how many bytes each: images up to ``max_image_bytes``, labels and captions up to
    ``max_text_bytes``. A larger member is skipped unread and marks its sample ``oversized``.
    A shard stream (pipe or URL) that delivers no byte for ``read_timeout_s`` is given up."""

    image_keys: tuple[str, ...] = IMAGE_EXTENSIONS
    class_keys: tuple[str, ...] = CLASS_EXTENSIONS
    caption_keys: tuple[str, ...] = CAPTION_EXTENSIONS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES
    read_timeout_s: float = 300.0

    def caps(self) -> dict[str, int]:
        """Extension -> largest size kept, in bytes."""
        caps = {key: self.max_text_bytes for key in self.class_keys + self.caption_keys}
        caps.update({key: self.max_image_bytes for key in self.image_keys})
        return caps


DEFAULT_POLICY = MemberPolicy()


_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")


def brace_expand(pattern: str) -> list[str]:
    """``d-{000..002}-{a,b}`` -> d-000-a, d-000-b, d-001-a, ... (left to right, no nesting).

    A numeric range keeps the zero padding of its bounds; a comma list gives each item.
    """
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numbers = _RANGE.fullmatch(body)
    if numbers:
        low, high = numbers.groups()
        if int(low) > int(high):
            raise ValueError(f"brace range {{{body}}} in {pattern!r} runs backwards")
        width = max(len(low), len(high)) if low.startswith("0") or high.startswith("0") else 0
        items = [f"{value:0{width}d}" for value in range(int(low), int(high) + 1)]
    else:
        items = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [head + item + rest for item in items for rest in brace_expand(tail)]


def expand_shards(pattern: str) -> list[str]:
    """Expand ``a-{000000..000003}.tar::b.tar`` into the list of shard URLs, in order."""
    urls: list[str] = []
    for part in pattern.split("::"):
        part = part.strip()
        if part:
            urls.extend(brace_expand(part))
    return urls


def check_shards_exist(pattern: str, urls: list[str]) -> None:
    """Fail early when a pattern's local paths name no readable file (typo, wrong directory);
    URLs and ``pipe:`` commands are only known to work once they are read."""
    if not urls:
        raise ValueError(f"shard pattern {pattern!r} expands to no shard")
    local = [url for url in urls if is_local(url)]
    if local and not any(os.path.isfile(url) for url in local):
        raise FileNotFoundError(
            f"shard pattern {pattern!r} expands to {len(local)} local paths and none exists "
            f"(first: {local[0]!r}); check the directory and the brace range")


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/0001.seg.jpg`` -> (``dir/0001``, ``seg.jpg``): the key ends at the basename's first dot."""
    directory, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return os.path.join(directory, stem) if directory else stem, ext.lower() if dot else ""


@dataclass
class RawSample:
    """The kept members of one sample (extension -> bytes), where it came from, and the
    extensions of wanted members that were over their size cap (left unread).

    ``index``: its position in the shard (0-based); ``end_offset``: the byte offset in the shard
    file where the next sample begins, 0 when unknown (compressed or streamed shards)."""

    key: str
    url: str
    members: dict[str, bytes]
    oversized: list[str] = field(default_factory=list)
    index: int = 0
    end_offset: int = 0

    @property
    def nbytes(self) -> int:
        return sum(len(data) for data in self.members.values())


def iter_samples(url: str, counter: SkipCounter, policy: MemberPolicy = DEFAULT_POLICY,
                 start: tuple[int, int] = (0, 0)) -> Iterator[RawSample]:
    """Yield every sample of one shard in order, including samples that lack kept members.

    A shard that cannot be opened or a tar that breaks off is counted and ends the iteration; every
    sample before the break is still yielded, the one being read when it broke included (with the
    members that were complete, as webdataset does; a missing one is then its ``missing_key``).

    ``start`` = (index, offset): begin at sample ``index``; a local uncompressed shard is entered
    by seeking to ``offset`` (a previous sample's ``end_offset``), anything else is read from its
    beginning and the samples before ``index`` are parsed and dropped.
    """
    try:
        stream = open_shard(url, policy.read_timeout_s)
    except Exception as error:  # noqa: BLE001 - OSError, gopen's ValueError, a missing CLI, ...
        counter.skip(OPEN_FAILED, url, error)
        return
    first_index = start[0]
    position, index = _seek_to(stream, start)
    keep, over_cap = _member_filter(policy)
    yielded = 0
    closed = False
    try:
        current: RawSample | None = None
        try:
            for name, data in iter_tar_files(stream, keep, position):
                key, ext = split_member_name(name)
                if current is not None and key != current.key:
                    current.end_offset = position.entry if position.seekable else 0
                    if current.index >= first_index:
                        yield current
                    yielded += 1
                    current = None
                if current is None:
                    current = RawSample(key, url, {}, index=index)
                    index += 1
                if data is not None:
                    current.members[ext] = data
                elif name == over_cap[0]:
                    current.oversized.append(ext)
            closed, failure = True, stream.close()
            if failure is not None:
                counter.skip(OPEN_FAILED, url, failure)
            if current is not None and current.index >= first_index:
                current.end_offset = position.end if position.seekable else 0
                yield current
        except Exception as error:  # noqa: BLE001 - damage in a hostile stream ends this shard only
            closed = True
            failure = stream.close(abandoned=isinstance(error, TimeoutError))
            # A tar whose first member is already damaged is truncated too; a stream with no
            # valid header at all is not a tar (or cannot be opened as one).
            started = yielded or current is not None or getattr(error, "headers_read", 0) > 0
            reason = TRUNCATED_TAR if started else OPEN_FAILED
            counter.skip(reason, url, f"{error}; {failure}" if failure else error)
            # Counted first: the consumer may stop after this sample.
            if current is not None and current.index >= first_index:
                yield current
    finally:
        if not closed:  # the consumer stopped early: what is left of the stream is not needed
            stream.close(abandoned=True)


def _seek_to(stream, start: tuple[int, int]) -> tuple[TarPosition, int]:
    """Enter a seekable shard at sample ``start[0]`` (byte offset ``start[1]``, when known);
    returns the tar position and the index of the first sample the reader will see."""
    index, offset = start
    if offset > 0 and stream.seekable():
        stream.seek(offset)
        return TarPosition(end=offset), index
    return TarPosition(), 0


def _member_filter(policy: MemberPolicy):
    """``keep(name, size)`` for the tar reader, and a one-element list holding the name of the
    last member it refused for its size (so the sample can be marked ``oversized``)."""
    caps = policy.caps()
    over_cap: list[str | None] = [None]

    def keep(name: str, size: int) -> bool:
        cap = caps.get(split_member_name(name)[1])
        if cap is not None and size > cap:
            over_cap[0] = name
            return False
        return cap is not None
    return keep, over_cap


def index_path(url: str) -> str:
    """The index file written beside ``.../train-000003.tar``: ``.../train-index.json``."""
    directory, base = os.path.split(url)
    prefix = base.rsplit("-", 1)[0] if "-" in base else base.split(".")[0]
    return os.path.join(directory, prefix + INDEX_SUFFIX)


OPEN_CLIP_SIZES = "sizes.json"  # open_clip: {"00000.tar": 9951, ...} beside the shards
IMG2DATASET_STATS_SUFFIX = "_stats.json"  # img2dataset: 00000.tar -> 00000_stats.json


def read_sample_counts(urls: list[str]) -> dict[str, int] | None:
    """Sample count of every shard from the size files beside them, or None if any is unknown.

    Looked up in order: our writer's ``PREFIX-index.json``, open_clip's ``sizes.json``, and
    img2dataset's ``{shard}_stats.json`` (its ``successes``: the samples the tar holds). Each
    file is read once. Only local shards have them; a URL or pipe: makes the answer None.
    """
    files: dict[str, dict[str, int]] = {}

    def table(path: str, read) -> dict[str, int]:
        if path not in files:
            files[path] = read(path) if os.path.isfile(path) else {}
        return files[path]

    counts: dict[str, int] = {}
    for url in urls:
        if not is_local(url):
            return None
        directory, base = os.path.split(url)
        count = table(index_path(url), _load_index).get(base)
        if count is None:
            count = table(os.path.join(directory, OPEN_CLIP_SIZES), _load_sizes).get(base)
        if count is None:
            stats = os.path.join(directory, _shard_stem(base) + IMG2DATASET_STATS_SUFFIX)
            count = table(stats, _load_img2dataset_stats).get("successes")
        if count is None:
            return None
        counts[url] = count
    return counts


def _shard_stem(base: str) -> str:
    """``00000.tar`` / ``00000.tar.gz`` -> ``00000``."""
    return base[: base.index(".tar")] if ".tar" in base else os.path.splitext(base)[0]


def _load_index(path: str) -> dict[str, int]:
    with open(path) as handle:
        return {name: int(count) for name, count in json.load(handle)["shards"].items()}


def _load_sizes(path: str) -> dict[str, int]:
    with open(path) as handle:
        return {name: int(count) for name, count in json.load(handle).items()}


def _load_img2dataset_stats(path: str) -> dict[str, int]:
    with open(path) as handle:
        stats = json.load(handle)
    return {"successes": int(stats["successes"])} if "successes" in stats else {}


def count_samples(url: str) -> int:
    """Count a shard's samples by reading its tar headers (used when there is no index)."""
    counter = SkipCounter()
    counter.enabled = False
    return sum(1 for _ in iter_samples(url, counter))


def shard_sample_counts(urls: list[str]) -> dict[str, int]:
    """Sample counts from the index when complete, else by reading every shard."""
    counts = read_sample_counts(urls)
    if counts is not None:
        return counts
    return {url: count_samples(url) for url in urls}


def find_shards(directory: str, prefix: str) -> list[str]:
    """Sorted shard paths ``directory/prefix-*.tar`` (for tools and tests)."""
    return sorted(glob.glob(os.path.join(directory, f"{prefix}-*.tar")))
