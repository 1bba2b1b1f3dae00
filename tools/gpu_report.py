"""The table that ends ``tools/gpu_check_training.sh``: its training benchmarks beside the data loader.

    python3 tools/gpu_report.py OUT                       # the table
    python3 tools/gpu_report.py OUT --gmacs MODEL IMG     # its count, if made

Reads ``OUT/bench.jsonl`` (the JSON lines of ``internimage.pretrain.bench``) and
``OUT/data_bench.json`` (``internimage.data.bench``). One row per timed run: images/s, MFU, peak
memory and the CPU cores (one loader worker each, RandAugment on) that keep up with it. A
``--micro-batch max`` search stopped before its final timing shows its largest fitting probe
(timed over a single step).
"""
from __future__ import annotations

import argparse
import json
import os

from internimage.data.bench import cores_needed

__all__ = ["known_gmacs", "timed_rows", "format_row", "main"]


def known_gmacs(rows: list[dict], model: str, img_size: int) -> float | None:
    """Multiply-adds per image (1e9) an earlier run of ``model`` at ``img_size`` counted, so a later
    one can skip the fvcore pass (tens of seconds for H)."""
    return next((r["gmacs_per_image"] for r in rows
                 if (r["model"], r["img_size"]) == (model, img_size) and "gmacs_per_image" in r), None)


def timed_rows(rows: list[dict]) -> list[dict]:
    """Every result but the probes of a max search, plus, for a search cut short (no ``largest``
    line), its largest probe that fit, marked ``cut_short``."""
    timed = [r for r in rows if not r.get("probe")]
    finished = {_setting(r) for r in rows if r.get("largest")}
    cut_short: dict[tuple, dict] = {}
    for r in rows:
        if r.get("probe") and not r.get("oom") and _setting(r) not in finished:
            best = cut_short.get(_setting(r))
            if best is None or r["micro_batch"] > best["micro_batch"]:
                cut_short[_setting(r)] = r
    return timed + [{**r, "cut_short": True} for r in cut_short.values()]


def _setting(row: dict) -> tuple:
    return row["model"], row["img_size"], row["checkpointing"]


HEADER = f"{'model':15} {'img':>4} {'batch':>6} {'ckpt':>5} {'img/s':>8} {'MFU':>6} {'peak GiB':>9} {'cores':>6}"


def format_row(row: dict, per_core: float | None) -> str:
    """One line of the table; ``per_core``: the loader's images/s per worker, None if unknown."""
    start = f"{row['model']:15} {row['img_size']:4} {row['micro_batch']:6} {str(row['checkpointing']):>5}"
    if row.get("oom"):
        return f"{start} out of memory"
    mfu = f"{row['mfu']:.3f}" if "mfu" in row else "-"
    cores = cores_needed(row["images_per_s"], per_core) if per_core else "-"
    return (f"{start} {row['images_per_s']:8.1f} {mfu:>6} {row['peak_memory_gib']:9.1f} {cores:>6}"
            f"{_search_note(row)}")


def _search_note(row: dict) -> str:
    if row.get("cut_short"):
        return "  largest probe that fit (search cut short; 1 timed step)"
    if not row.get("largest"):
        return ""
    if row["first_oom"] is None:
        return "  largest: the search limit fit"
    return f"  largest; {row['first_oom']} did not fit"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the device check's output folder")
    parser.add_argument("--gmacs", nargs=2, metavar=("MODEL", "IMG"),
                        help="print the GMACs per image counted for MODEL at IMG px (or nothing)")
    args = parser.parse_args(argv)
    bench = os.path.join(args.out, "bench.jsonl")
    rows = [json.loads(line) for line in open(bench)] if os.path.exists(bench) else []
    if args.gmacs:
        print(known_gmacs(rows, args.gmacs[0], int(args.gmacs[1])) or "")
        return 0
    data = os.path.join(args.out, "data_bench.json")
    loader = json.load(open(data)) if os.path.exists(data) else {}
    per_core = loader.get("loader_workers_randaugment", {}).get("per_worker")
    if per_core:
        print(f"loader: {per_core:.0f} img/s per worker with RandAugment; cores = img/s / that")
    print(HEADER)
    for row in timed_rows(rows):
        print(format_row(row, per_core))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
