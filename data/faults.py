"""Counting and rate-limited logging of skipped samples.

Bad data is normal at web scale; a run must neither die on it nor hide it. Every skip is counted
per reason (the counts reach the training metrics) and logged at most once per interval per
reason so a broken shard cannot flood the log.
"""
from __future__ import annotations

import logging
import time

LOGGER = logging.getLogger("internimage.data")

# Reasons a sample or a shard is skipped; the keys of ``skip_counts()``.
OPEN_FAILED = "open_failed"          # shard missing, unreadable, or pipe command failed
TRUNCATED_TAR = "truncated_tar"      # tar ends early or has a corrupt header
CORRUPT_IMAGE = "corrupt_image"      # image bytes do not decode
MISSING_KEY = "missing_key"          # no image, or no label of the source's kind
BAD_LABEL = "bad_label"              # .cls not a class id in range, caption not UTF-8 / bad JSON
OVERSIZED = "oversized"              # a member over its size cap (max_image_mib / max_text_kib)
REASONS = (OPEN_FAILED, TRUNCATED_TAR, CORRUPT_IMAGE, MISSING_KEY, BAD_LABEL, OVERSIZED)


class SkipCounter:
    """Counts skips per reason and logs each reason at most every ``log_interval_s`` seconds."""

    def __init__(self, log_interval_s: float = 30.0, counts: dict[str, int] | None = None):
        self.counts = {reason: 0 for reason in REASONS}
        if counts:
            self.counts.update(counts)
        self.log_interval_s = log_interval_s
        self.enabled = True
        self._last_logged: dict[str, float] = {}

    def skip(self, reason: str, where: str, error: object = None) -> None:
        """Record one skip; ``where`` names the shard or sample for the log line."""
        if not self.enabled:
            return
        self.counts[reason] = self.counts.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._last_logged.get(reason, -float("inf")) >= self.log_interval_s:
            self._last_logged[reason] = now
            LOGGER.warning("skipped (%s, %d so far): %s%s", reason, self.counts[reason], where,
                           f": {error}" if error is not None else "")

    def total(self) -> int:
        return sum(self.counts.values())


class FailureRate:
    """Share of failed samples among the last ``window`` samples of one source in one worker.

    A ring of one byte per sample: O(1) per sample and ``window`` bytes of memory. ``exceeds``
    answers only once ``min_samples`` were seen, so a single early failure never stops a run.
    """

    def __init__(self, window: int, min_samples: int = 100):
        self.window = max(1, window)
        self.min_samples = min(self.window, max(1, min_samples))
        self._ring = bytearray(self.window)
        self._next = 0
        self.seen = 0
        self.failures = 0

    def record(self, failed: bool) -> None:
        self.failures += failed - self._ring[self._next]
        self._ring[self._next] = failed
        self._next = (self._next + 1) % self.window
        self.seen = min(self.seen + 1, self.window)

    def exceeds(self, limit: float) -> bool:
        return self.seen >= self.min_samples and self.failures > limit * self.seen
