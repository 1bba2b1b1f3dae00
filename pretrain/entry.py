"""What every per-rank entry point (pretraining, fine-tuning) does around its work: read the
command line and the config (config errors exit 2 before any process group exists), join the
process group, run, and leave together."""
from __future__ import annotations

import sys
from typing import Callable, TypeVar

from .config import ConfigError, PretrainConfig
from .distributed import explain_failure, init_distributed, leave_distributed, rank
from .guards import NonFiniteError

__all__ = ["parse_cli", "run_entry"]

Config = TypeVar("Config", bound=PretrainConfig)


def parse_cli(argv: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG.yaml] [key=value ...]``. DeepSpeed's own habits are understood: a ``--local_rank``
    from the launcher is ignored, ``--deepspeed`` too, and ``--deepspeed_config FILE`` means
    ``deepspeed.config_file=FILE``."""
    config, overrides = None, []
    args = iter(argv)
    for arg in args:
        if arg.startswith("--local_rank"):
            if arg == "--local_rank":
                next(args, None)
            continue
        if arg == "--deepspeed":
            continue
        if arg.startswith("--deepspeed_config"):
            path = arg.split("=", 1)[1] if "=" in arg else next(args, None)
            if not path:
                raise ConfigError("--deepspeed_config needs a file: --deepspeed_config ds.json.")
            overrides.append(f"deepspeed.config_file={path}")
            continue
        if "=" in arg:
            overrides.append(arg)
        elif config is None:
            config = arg
        else:
            raise ConfigError(f"Unexpected argument '{arg}': give one config file, then key=value "
                              "overrides.")
    return config, overrides


def run_entry(argv: list[str] | None, load: Callable[[str | None, list[str]], Config],
              work: Callable[[Config], int]) -> int:
    """One rank's entry point: CLI → ``load`` (config errors exit 2 before any collective) → process
    group → ``work`` → leave together. Exit codes: 0 done or preempted, 2 config, 3 non-finite,
    4 a checkpoint write failed, 5 a rank stopped answering (``distributed.HEARTBEAT_EXIT_CODE``)."""
    try:
        config_path, overrides = parse_cli(sys.argv[1:] if argv is None else argv)
        cfg = load(config_path, overrides)
    except (ConfigError, ValueError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    d = cfg.deepspeed
    if not init_distributed(d.precision, d.collective_timeout_minutes * 60, d.heartbeat_timeout_seconds, tf32=d.tf32):
        return 2
    try:
        code = work(cfg)
    except NonFiniteError as exc:
        print(f"rank {rank()}: {exc}", file=sys.stderr, flush=True)
        return 3
    except RuntimeError as exc:  # a peer lost: name it rather than show gloo's or NCCL's words alone
        explain_failure(exc)
        raise
    leave_distributed()
    return code
