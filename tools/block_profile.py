"""Where one InternImage training step spends its time on the CPU: a torch.profiler table grouped by
top-level op (the ops Python calls directly, their children included; in the backward, the autograd
node), per phase (forward, backward, optimizer).

    python tools/block_profile.py [--model internimage_t] [--img-size 64] [--batch 8] [--out PATH]

Prints the table and writes it as JSON (default docs/benchmarks/pretrain/block_profile_cpu_<model>_<img>px.json)
with the profiler's own self-time table beside it (.txt).
"""
from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from internimage.model import create_model
from internimage.ops import kernels_available

from machine import machine_info  # tools/machine.py (python puts tools/ on the path)

REPO = Path(__file__).resolve().parents[1]
PHASES = ("forward", "backward", "optimizer")
BACKWARD_PREFIX = "autograd::engine::evaluate_function: "  # dropped from backward op names


def top_level_ops(events) -> dict[tuple[str, str], dict]:
    """(phase, op) → calls and inclusive CPU time (µs) of each phase range's direct children."""
    table: dict[tuple[str, str], dict] = collections.defaultdict(lambda: {"calls": 0, "cpu_us": 0.0})
    for event in events:
        parent = event.cpu_parent
        if parent is None or parent.cpu_parent is not None or parent.name not in PHASES:
            continue
        row = table[(parent.name, event.name.removeprefix(BACKWARD_PREFIX))]
        row["calls"] += 1
        row["cpu_us"] += event.cpu_time_total
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="internimage_t")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rows", type=int, default=12, help="ops shown per phase")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = create_model(args.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size)
    labels = torch.randint(0, model.num_classes, (args.batch,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with record_function("forward"):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            optimizer.step()

    for _ in range(2):  # warm-up: allocator, optimizer state, lazy initialisation
        step()
    unprofiled = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        unprofiled.append((time.perf_counter() - start) * 1e3)
    unprofiled_ms = sorted(unprofiled)[1]
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    wall_ms = (time.perf_counter() - start) * 1e3

    events = prof.events()
    phase_us = {e.name: e.cpu_time_total for e in events if e.cpu_parent is None and e.name in PHASES}
    table = top_level_ops(events)
    step_us = sum(phase_us.values())
    rows = sorted(({"phase": phase, "op": op, "calls": v["calls"], "cpu_ms": v["cpu_us"] / 1e3,
                    "percent_of_step": 100 * v["cpu_us"] / step_us} for (phase, op), v in table.items()),
                  key=lambda r: (PHASES.index(r["phase"]), -r["cpu_ms"]))

    fused = kernels_available("cpu")
    print(f"{args.model}, batch {args.batch} at {args.img_size} px, one training step (AdamW) on the CPU, "
          f"{torch.get_num_threads()} threads, DCNv3 {'fused CPU kernel' if fused else 'reference'}; "
          f"step {unprofiled_ms:.1f} ms (median of 3), profiled {wall_ms:.1f} ms wall")
    for phase in PHASES:
        phase_rows = [r for r in rows if r["phase"] == phase]
        print(f"\n{phase}: {phase_us.get(phase, 0) / 1e3:.1f} ms "
              f"({100 * phase_us.get(phase, 0) / step_us:.1f}% of the step)")
        print(f"  {'top-level op':<60} {'calls':>6} {'ms':>9} {'% step':>7}")
        for r in phase_rows[:args.rows]:
            print(f"  {r['op'][:60]:<60} {r['calls']:>6} {r['cpu_ms']:>9.2f} {r['percent_of_step']:>7.1f}")
        rest = phase_rows[args.rows:]
        if rest:
            print(f"  {f'({len(rest)} more ops)':<60} {sum(r['calls'] for r in rest):>6} "
                  f"{sum(r['cpu_ms'] for r in rest):>9.2f} {sum(r['percent_of_step'] for r in rest):>7.1f}")

    out = args.out or (REPO / "docs" / "benchmarks" / "pretrain"
                       / f"block_profile_cpu_{args.model}_{args.img_size}px.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": f"python tools/block_profile.py --model {args.model} --img-size {args.img_size} "
                         f"--batch {args.batch}",
              "machine": machine_info(),
              "dcnv3": "fused CPU kernel" if fused else "reference", "step_ms_median_of_3": unprofiled_ms,
              "profiled_step_wall_ms": wall_ms,
              "phase_ms": {p: phase_us.get(p, 0) / 1e3 for p in PHASES}, "rows": rows}
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".txt").write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40) + "\n")
    print(f"\nsaved {out.relative_to(REPO) if out.is_relative_to(REPO) else out} and .txt (self-time table)")


if __name__ == "__main__":
    main()
