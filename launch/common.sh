# Shared by launch/pretrain.sh and launch/finetune.sh (sourced, not run).
#
# launch_ranks MODULE ARGS...: runs `python -m MODULE ARGS...` on every rank through the `deepspeed`
# launcher and exits with its code (0 too when the ranks saved for a stop signal, see run_launcher):
#   one node      default; all GPUs, or NPROC_PER_NODE CPU processes (2) when there is no GPU
#   several nodes HOSTFILE=path (MPI style: "host slots=N" per line), optional NUM_NODES,
#                 MASTER_ADDR, MASTER_PORT; the deepspeed launcher reaches the other nodes by ssh (pdsh)
#   no ssh        HOSTFILE plus NODE_RANK=i on every node: one launcher per node (--no_ssh)
#   Slurm         inside `srun --ntasks-per-node=1 bash launch/<script>.sh ...`: the hostfile, node
#                 rank and master address come from SLURM_JOB_NODELIST / SLURM_NODEID
# Other knobs: PYTHON (interpreter, default the active python), GPUS_PER_NODE (Slurm hostfile slots).

# usage: the calling script's header comment, then where it runs (this file's header).
usage() {
  sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"
  echo
  sed -n '/^# launch_ranks/,/^# Other knobs/{s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
  echo
  echo "Overrides are key.sub=value (configs/*.yaml, pretrain/config.py); DeepSpeed's --deepspeed_config"
  echo "FILE adds your own DeepSpeed JSON under the YAML. Under Slurm send SIGUSR1 before the time limit"
  echo "(sbatch --signal=USR1@600): every rank checkpoints and exits 0, and the same command resumes;"
  echo "launch/slurm_pretrain.sbatch is a batch job that does this and requeues itself."
  echo "Without the deepspeed launcher: torchrun --nproc_per_node N -m internimage.pretrain.train CONFIG"
  echo "[key=value ...] (torchrun sets RANK, LOCAL_RANK and WORLD_SIZE as the launcher does)."
}

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
export PYTHON="${PYTHON:-$(command -v python || command -v python3)}"

# config_argument DEFAULT ARGS...: sets CONFIG (the first argument unless it is a key=value
# override or an option such as --deepspeed_config, else DEFAULT) and ARGS (the rest); fails when
# the file does not exist.
config_argument() {
  CONFIG="$1"
  shift
  if [[ " $* " == *" --help "* || " $* " == *" -h "* ]]; then
    usage
    exit 0
  fi
  if [[ $# -gt 0 && "$1" != *=* && "$1" != --* ]]; then
    CONFIG="$1"
    shift
  fi
  ARGS=("$@")
  if [[ ! -f "$CONFIG" ]]; then
    echo "$(basename "$0"): config '$CONFIG' not found (give a YAML file from configs/)" >&2
    exit 2
  fi
}

# remote_shell_launch: true when the deepspeed launcher starts the other nodes through pdsh, whose
# remote shell re-parses every argument (braces, $VAR and backticks would expand there): the config
# check then writes the resolved config to RUN_DIR/launch_config.yaml and only its path is passed.
remote_shell_launch() {
  [[ -n "${HOSTFILE:-}" && -z "${NODE_RANK:-}" ]] && ! [[ -n "${SLURM_JOB_ID:-}" && "${SLURM_NNODES:-1}" -gt 1 ]]
}

# check_config < PYTHON_CHECK: runs the config check read from stdin with CONFIG and ARGS, its output
# in CHECK_OUTPUT; in a remote-shell launch, CONFIG and ARGS become the resolved config it wrote.
check_config() {
  local resolved=""
  if remote_shell_launch; then
    resolved="$(mktemp)"
  fi
  CHECK_OUTPUT="$(INTERNIMAGE_RESOLVED_OUT="$resolved" "$PYTHON" - "$CONFIG" "${ARGS[@]}")" || exit 2
  if [[ -n "$resolved" ]]; then
    CONFIG="$(cat "$resolved")"
    ARGS=()
    rm -f "$resolved"
  fi
}

launch_ranks() {
  local module="$1"
  shift
  NUM_GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
  LAUNCH=("$PYTHON" -m deepspeed.launcher.runner)
  if [[ "$NUM_GPUS" == "0" ]]; then
    export DS_ACCELERATOR=cpu
    PER_NODE="${NPROC_PER_NODE:-2}"
    # Each rank gets its share of the cores instead of every rank spawning one thread per core.
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / PER_NODE > 0 ? $(nproc) / PER_NODE : 1 ))}"
  else
    PER_NODE="${NPROC_PER_NODE:-$NUM_GPUS}"
  fi
  MASTER_PORT="${MASTER_PORT:-29500}"

  if [[ -n "${SLURM_JOB_ID:-}" && "${SLURM_NNODES:-1}" -gt 1 ]]; then
    if [[ -z "${HOSTFILE:-}" ]]; then  # never overwrite a hostfile the user gave
      HOSTFILE="${TMPDIR:-/tmp}/internimage_hostfile_${SLURM_JOB_ID}_${SLURM_NODEID}"
      scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=${GPUS_PER_NODE:-$PER_NODE}/" > "$HOSTFILE"
    fi
    MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
    NODE_RANK="${SLURM_NODEID}"
  fi

  if [[ -n "${HOSTFILE:-}" ]]; then
    LAUNCH+=(--hostfile "$HOSTFILE" --master_port "$MASTER_PORT")
    [[ -n "${NUM_NODES:-}" ]] && LAUNCH+=(--num_nodes "$NUM_NODES")
    [[ -n "${MASTER_ADDR:-}" ]] && LAUNCH+=(--master_addr "$MASTER_ADDR")
    if [[ -n "${NODE_RANK:-}" ]]; then
      LAUNCH+=(--no_ssh --node_rank "$NODE_RANK")
    fi
  else
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "$NUM_GPUS" != "0" && -z "${NPROC_PER_NODE:-}" ]]; then
      # --num_gpus would make the deepspeed runner drop CUDA_VISIBLE_DEVICES and use GPUs 0..n-1.
      LAUNCH+=(--include "localhost:${CUDA_VISIBLE_DEVICES}" --master_port "$MASTER_PORT")
    else
      LAUNCH+=(--num_gpus "$PER_NODE" --master_port "$MASTER_PORT")
    fi
    [[ -n "${MASTER_ADDR:-}" ]] && LAUNCH+=(--master_addr "$MASTER_ADDR")
  fi

  run_launcher "${LAUNCH[@]}" --no_local_rank --module "$module" "$@"
}

# run_launcher COMMAND...: runs the launcher and exits with its code, leaving stop signals to the
# ranks (each saves a checkpoint, then exits 0). The launcher and this shell get the signals of a
# whole job too (Slurm, kill -TERM -PGID, Ctrl-C); the deepspeed runner ignores TERM, INT and USR1
# (set before exec, inherited), launch.py ignores USR1 but catches TERM and INT itself: it passes
# them on and SIGKILLs the ranks still alive 30 s later, then exits 1 — hence RUN_DIR's preemption
# record decides the exit code. A signal to this shell alone (sbatch --signal=B:USR1) is passed to
# the ranks as SIGUSR1, which no launcher process acts on: the ranks save without a time limit.
run_launcher() {
  local started
  started="$(date +%s)"
  ( trap '' TERM INT USR1; exec "$@" ) &
  local launcher=$!
  # shellcheck disable=SC2064  # the pid is fixed now
  trap "forward_stop_signal $launcher" TERM INT USR1 HUP
  local code=0
  while true; do
    wait "$launcher" && code=0 || code=$?
    kill -0 "$launcher" 2>/dev/null || break  # ended; else a trapped signal interrupted the wait
  done
  trap - TERM INT USR1 HUP
  local record="${RUN_DIR:-}/preempted.json"
  if [[ "$code" != 0 && -n "${RUN_DIR:-}" && -f "$record" ]] && (( $(stat -c %Y "$record") >= started )); then
    echo "$(basename "$0"): the ranks saved a checkpoint for a stop signal ($(cat "$record")); the" \
         "launcher's exit code $code is its own reaction to the signal. Run the same command to resume." >&2
    code=0
  fi
  exit "$code"
}

# forward_stop_signal PID: SIGUSR1 to every process below PID (ranks act on it; the launcher
# processes and the data-loader workers ignore it).
forward_stop_signal() {
  local pids
  pids="$(descendants "$1")"
  [[ -n "$pids" ]] && kill -USR1 $pids 2>/dev/null
  return 0
}

descendants() {
  local child
  for child in $(pgrep -P "$1"); do
    echo "$child"
    descendants "$child"
  done
}
