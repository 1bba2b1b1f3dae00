"""Per-step cost of the sharded EMA update (pretrain/ema.py) for one rank of a ZeRO-3 job, on the CPU.

No DeepSpeed and no processes: the parameter list comes from ``create_model(MODEL)`` on the meta
device; only this rank's shards are allocated, as ZeRO-3 partitions them (every parameter flattened,
padded to a multiple of the world size, ceil(numel / world) elements per rank), with the fp32
masters as views into one flat buffer (DeepSpeed's ``fp32_partitioned_groups_flat``).

  per-parameter  the update before the fused one: per parameter a Python call that finds the slice
                 (a dict lookup by parameter id, ``narrow`` of the flat buffer, ``.to(device)``,
                 ``.float()``: what ``safe_get_local_fp32_param`` does on a resident fp32 partition)
                 and one ``lerp_``. DeepSpeed's own call adds more (accelerator queries, on GPUs a
                 stream synchronize per parameter), so this is the old path's lower bound.
  lookups only   the per-parameter path without its lerp_: the lookup overhead alone.
  foreach        the update now: one ``torch._foreach_lerp_`` over cached master views.

    python tools/ema_step_time.py [--model internimage_h] [--world 64] [--steps 10] [--rounds 5] [--out PATH]

Prints a table (ms/step, tensors, MB of shadow) and writes JSON (default
docs/benchmarks/pretrain/ema_step_cpu_<model>_w<world>.json).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from internimage.model import create_model

from machine import machine_info  # tools/machine.py (python puts tools/ on the path)

REPO = Path(__file__).resolve().parents[1]


def shard_sizes(model_name: str, world: int) -> list[int]:
    """This rank's ZeRO-3 slice length of every trainable parameter, in ``named_parameters`` order."""
    with torch.device("meta"):
        model = create_model(model_name)
    return [math.ceil(p.numel() / world) for p in model.parameters() if p.requires_grad]


class FlatMasters:
    """One flat fp32 partition and the per-parameter position table, as the ZeRO-3 optimizer holds them."""

    def __init__(self, sizes: list[int]):
        self.flat = torch.randn(sum(sizes))
        self.position, offset = {}, 0
        for key, size in enumerate(sizes):
            self.position[key] = (0, offset, size)  # (sub-group, offset, numel)
            offset += size

    def local_fp32(self, key: int) -> torch.Tensor:
        """The old path's lookup, per parameter and per step."""
        _group, offset, numel = self.position[key]
        return self.flat.narrow(0, offset, numel).to(self.flat.device).float()


def time_steps(update, steps: int) -> list[float]:
    for _ in range(3):  # warm-up
        update()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        update()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="internimage_h")
    parser.add_argument("--world", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per style and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--decay", type=float, default=0.9999)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    sizes = shard_sizes(args.model, args.world)
    masters = FlatMasters(sizes)
    shadows = [torch.randn(size) for size in sizes]
    weight = 1.0 - args.decay
    keys = list(range(len(sizes)))

    @torch.no_grad()
    def per_parameter() -> None:
        for key, shadow in zip(keys, shadows):
            shadow.lerp_(masters.local_fp32(key), weight)

    @torch.no_grad()
    def lookups_only() -> None:  # the old path's Python and view overhead alone
        for key in keys:
            masters.local_fp32(key)

    views = [masters.local_fp32(key) for key in keys]  # looked up once, as pretrain/ema.py caches them

    @torch.no_grad()
    def foreach() -> None:
        torch._foreach_lerp_(shadows, views, weight)

    # Alternate the two styles in rounds so that both see the same load from a shared machine.
    styles = {"per-parameter": per_parameter, "foreach": foreach, "lookups only": lookups_only}
    results = {style: [] for style in styles}
    for _ in range(args.rounds):
        for style, update in styles.items():
            results[style] += time_steps(update, args.steps)

    shadow_mb = sum(sizes) * 4 / 2**20
    rows = []
    for style, times in results.items():
        rows.append({"style": style, "ms_per_step_median": statistics.median(times),
                     "ms_per_step_min": min(times), "tensors": len(sizes), "shadow_mb": shadow_mb,
                     "times_ms": times})
    print(f"{args.model}, one rank of {args.world} (ZeRO-3 shards), {sum(sizes):,} fp32 elements per rank, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'style':<15} {'ms/step (median)':>17} {'ms/step (min)':>14} {'tensors':>8} {'MB':>8}")
    for row in rows:
        print(f"{row['style']:<15} {row['ms_per_step_median']:>17.2f} {row['ms_per_step_min']:>14.2f} "
              f"{row['tensors']:>8} {row['shadow_mb']:>8.1f}")
    per_param, fused = (statistics.median(results[s]) for s in ("per-parameter", "foreach"))
    print(f"foreach / per-parameter: {fused / per_param:.2f}")

    out = args.out or REPO / "docs" / "benchmarks" / "pretrain" / f"ema_step_cpu_{args.model}_w{args.world}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": f"python tools/ema_step_time.py --model {args.model} --world {args.world} "
                         f"--steps {args.steps} --rounds {args.rounds}",
              "machine": machine_info(),
              "model": args.model, "world": args.world, "elements_per_rank": sum(sizes),
              "decay": args.decay, "rows": rows}
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"saved {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")


if __name__ == "__main__":
    main()
