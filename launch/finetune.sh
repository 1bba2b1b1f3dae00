#!/usr/bin/env bash
# Fine-tuning launcher: raises the resolution stage by stage (python -m internimage.pretrain.finetune).
#
#   bash launch/finetune.sh [CONFIG.yaml] [key=value ...]
#
# No CONFIG: configs/finetune_demo.yaml, which fine-tunes the demo pretraining run (runs/demo) and
# runs that first (bash launch/pretrain.sh) when it is missing. Where it runs (one node, hostfile,
# no-ssh node ranks, Slurm): see launch/common.sh. The same command resumes an interrupted run.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
config_argument configs/finetune_demo.yaml "$@"

# Validate the config and overrides before starting any process (every rank checks again with the
# real world size); prints the run folder, then the init source when it is the missing demo
# pretraining run.
check_config <<'PY'
import os, sys
from internimage.pretrain.entry import parse_cli
from internimage.pretrain.config import ConfigError, load_config, write_launch_config
from internimage.pretrain.finetuning import load_finetune_config
try:
    cfg = load_finetune_config(sys.argv[1], parse_cli(sys.argv[2:])[1])
    write_launch_config(cfg)
except (ConfigError, ValueError) as exc:
    print(f"finetune.sh: config error: {exc}", file=sys.stderr)
    sys.exit(2)
print(cfg.run_dir)
if not os.path.exists(cfg.init.source):
    if os.path.abspath(cfg.init.source) == os.path.abspath(load_config("configs/demo.yaml").run_dir):
        print(cfg.init.source)
    else:
        print(f"finetune.sh: init.source {cfg.init.source} does not exist", file=sys.stderr)
        sys.exit(2)
PY
RUN_DIR="$(sed -n 1p <<<"$CHECK_OUTPUT")"
MISSING_DEMO_RUN="$(sed -n 2p <<<"$CHECK_OUTPUT")"

if [[ -n "$MISSING_DEMO_RUN" ]]; then
  echo "finetune.sh: no demo pretraining run at $MISSING_DEMO_RUN; running bash launch/pretrain.sh first"
  bash launch/pretrain.sh configs/demo.yaml
fi

launch_ranks internimage.pretrain.finetune "$CONFIG" "${ARGS[@]}"
