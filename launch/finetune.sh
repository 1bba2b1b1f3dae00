#!/usr/bin/env bash
# Fine-tuning launcher: raises the resolution stage by stage (python -m internimage.pretrain.finetune).
#
#   bash launch/finetune.sh [CONFIG.yaml] [key=value ...]
#
# No CONFIG: configs/finetune_demo.yaml, which fine-tunes the demo pretraining run (runs/demo) and
# runs that first (bash launch/pretrain.sh) when it is missing. Where it runs (one node, hostfile,
# no-ssh node ranks, Slurm): see launch/run_deepspeed.sh. The same command resumes an interrupted run.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
PYTHON="${PYTHON:-python3}"

CONFIG="configs/finetune_demo.yaml"
if [[ $# -gt 0 && "$1" != *=* ]]; then
  CONFIG="$1"
  shift
fi
if [[ ! -f "$CONFIG" ]]; then
  echo "finetune.sh: config '$CONFIG' not found (give a YAML file from configs/)" >&2
  exit 2
fi

# Validate the config and overrides before starting any process (every rank checks again with the
# real world size); prints the init source when it is the missing demo pretraining run.
MISSING_DEMO_RUN="$("$PYTHON" - "$CONFIG" "$@" <<'PY'
import os, sys
from internimage.pretrain.config import ConfigError, load_config
from internimage.pretrain.finetune import load_finetune_config
try:
    cfg = load_finetune_config(sys.argv[1], [a for a in sys.argv[2:] if "=" in a])
except (ConfigError, ValueError) as exc:
    print(f"finetune.sh: config error: {exc}", file=sys.stderr)
    sys.exit(2)
if not os.path.exists(cfg.init.source):
    if os.path.abspath(cfg.init.source) == os.path.abspath(load_config("configs/demo.yaml").run_dir):
        print(cfg.init.source)
    else:
        print(f"finetune.sh: init.source {cfg.init.source} does not exist", file=sys.stderr)
        sys.exit(2)
PY
)" || exit 2

if [[ -n "$MISSING_DEMO_RUN" ]]; then
  echo "finetune.sh: no demo pretraining run at $MISSING_DEMO_RUN; running bash launch/pretrain.sh first"
  bash launch/pretrain.sh configs/demo.yaml
fi

exec bash launch/run_deepspeed.sh internimage.pretrain.finetune "$CONFIG" "$@"
