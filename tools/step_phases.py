"""Where one training step's time goes, per rank: the real Trainer under the deepspeed launcher.

Each phase of the loop is wrapped with a timer (the loop itself is unchanged): data wait (the host
waiting for the loader), device batch (copy, normalise, mix), forward, loss check (the non-finite
loss vote: a collective and a host sync per micro-batch), backward, gradient check (the
non-finite gradient vote), optimizer step, EMA, logging (every ``logging.every_steps``), and
"other" (the step's wall time minus the phases). The first ``--skip`` steps are left out.

On a GPU the timers synchronize the device around each phase, which serialises host and device;
read a GPU table as the cost of each phase, not as overlap. On the CPU nothing is asynchronous.

    python -m deepspeed.launcher.runner --num_gpus 2 --no_local_rank tools/step_phases.py \\
        [--steps 12] [--skip 2] [--label NAME] -- configs/demo.yaml key=value ...

Rank 0 prints the table (median ms per step over ranks' medians) and writes JSON to
docs/benchmarks/pretrain/step_phases_<label>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

from machine import machine_info  # tools/machine.py (python puts tools/ on the path)

REPO = Path(__file__).resolve().parents[1]
PHASES = ["data wait", "device batch", "forward", "loss check", "backward", "gradient check",
          "optimizer step", "ema", "logging"]


class PhaseClock:
    """Seconds per phase, per optimizer step."""

    def __init__(self, synchronize: Callable[[], None]):
        self.synchronize = synchronize
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            self.synchronize()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.synchronize()
                self.current[name] += time.perf_counter() - start
        return timed

    def end_step(self, wall_s: float, data_wait_s: float) -> None:
        self.current["data wait"] += data_wait_s
        self.current["total"] = wall_s
        self.current["other"] = wall_s - sum(v for k, v in self.current.items() if k not in ("total", "other"))
        self.steps.append(dict(self.current))
        self.current = defaultdict(float)


def instrument(trainer, clock: PhaseClock) -> None:
    """Wraps the trainer's phases (instance attributes and the names its module imported)."""
    from internimage.pretrain import trainer as trainer_module
    trainer._device_batch = clock.wrap("device batch", trainer._device_batch)
    trainer._forward = clock.wrap("forward", trainer._forward)
    trainer.engine.backward = clock.wrap("backward", trainer.engine.backward)
    trainer.engine.step = clock.wrap("optimizer step", trainer.engine.step)
    trainer._log = clock.wrap("logging", trainer._log)
    if trainer.ema is not None:
        trainer.ema.update = clock.wrap("ema", trainer.ema.update)
    trainer_module.all_ranks = clock.wrap("loss check", trainer_module.all_ranks)
    trainer_module.gradients_finite = clock.wrap("gradient check", trainer_module.gradients_finite)

    step_once = trainer._optimizer_step

    def timed_step(batches):
        start = time.perf_counter()
        losses, wait = step_once(batches)
        clock.end_step(time.perf_counter() - start, wait)
        return losses, wait
    trainer._optimizer_step = timed_step


def summarize(per_rank: list[list[dict]], skip: int) -> dict[str, float]:
    """Milliseconds per step: the median over steps on each rank, then the median over ranks."""
    names = PHASES + ["other", "total"]
    return {name: 1e3 * statistics.median(statistics.median(step.get(name, 0.0) for step in steps[skip:])
                                          for steps in per_rank) for name in names}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2)
    parser.add_argument("--label", default="cpu")
    parser.add_argument("config_and_overrides", nargs="+")
    args = parser.parse_args([a for a in sys.argv[1:] if a != "--"])

    from internimage.pretrain.config import load_config
    from internimage.pretrain.distributed import gather_objects, init_distributed, leave_distributed, rank, \
        synchronize
    from internimage.pretrain.entry import parse_cli
    from internimage.pretrain.trainer import Trainer

    config, overrides = parse_cli(args.config_and_overrides)
    cfg = load_config(config, overrides + [f"schedule.total_steps={args.steps}", "checkpoint.every_steps=0",
                                           "checkpoint.resume=null",
                                           "eval.at_end=false", "eval.every_steps=0", "logging.progress_bar=false"])
    init_distributed(cfg.deepspeed.precision)
    trainer = Trainer(cfg)
    clock = PhaseClock(synchronize)
    instrument(trainer, clock)
    trainer.run()
    per_rank = gather_objects(clock.steps)
    if rank() == 0:
        table = summarize(per_rank, args.skip)
        print(f"\n{'phase':<16}{'ms/step':>10}{'share':>8}")
        for name, ms in table.items():
            print(f"{name:<16}{ms:>10.2f}{ms / table['total']:>8.1%}")
        out = REPO / "docs" / "benchmarks" / "pretrain" / f"step_phases_{args.label}.json"
        out.write_text(json.dumps({"machine": machine_info(), "config": config, "overrides": overrides,
                                   "steps": args.steps, "skipped": args.skip, "ms_per_step": table,
                                   "per_rank_steps": per_rank}, indent=1))
        print(f"written: {out}")
    leave_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
