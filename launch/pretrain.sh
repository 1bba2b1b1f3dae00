#!/usr/bin/env bash
# Pretraining launcher: wraps the `deepspeed` launcher around `python -m internimage.pretrain.train`.
#
#   bash launch/pretrain.sh [CONFIG.yaml] [key=value ...]
#
# No CONFIG: configs/demo_mixed.yaml (its demo shards are written first when missing or outdated). Where it runs
# (one node, hostfile, no-ssh node ranks, Slurm): see launch/common.sh. Re-running the same
# command resumes from the run's latest checkpoint.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
config_argument configs/demo_mixed.yaml "$@"

# Validate the config and overrides before starting any process; prints the run folder, then the
# demo data folder when this config reads the demo shards and they are missing or older than this
# version.
check_config <<'EOF'
import sys
from internimage.pretrain.entry import parse_cli
from internimage.pretrain.config import ConfigError, load_config, write_launch_config
from internimage.data.demo import demo_data_current
try:
    cfg = load_config(sys.argv[1], parse_cli(sys.argv[2:])[1])
    write_launch_config(cfg)
except (ConfigError, ValueError) as exc:
    print(f"pretrain.sh: config error: {exc}", file=sys.stderr)
    sys.exit(2)
print(cfg.run_dir)
for source in cfg.data.train_sources:
    if "demo_data/" in source.shards:
        folder = source.shards.split("demo_data/")[0] + "demo_data"
        if not demo_data_current(folder):
            print(folder)
        break
EOF
RUN_DIR="$(sed -n 1p <<<"$CHECK_OUTPUT")"
DEMO_DATA="$(sed -n 2p <<<"$CHECK_OUTPUT")"

if [[ -n "$DEMO_DATA" ]]; then
  echo "pretrain.sh: writing the demo shards to $DEMO_DATA"
  "$PYTHON" -m internimage.data.demo --out "$DEMO_DATA"
fi

launch_ranks internimage.pretrain.train "$CONFIG" "${ARGS[@]}"
