#!/usr/bin/env bash
# distthink SLURM launcher: the part every slurm/*.sbatch template shares (they `exec` it; `distthink
# slurm render` inlines it, so what you read is what runs).
#
# It runs as the batch shell on the first node of the allocation and
#   1. checks the settings and the run config (fails before anything starts, with the reason);
#   2. works out the rendezvous: head node = first of `scontrol show hostnames $SLURM_JOB_NODELIST`,
#      its NodeAddr, and a free port there (or one derived from the job id);
#   3. starts ONE srun task per node (--kill-on-bad-exit=1: a task that fails ends the step at once,
#      instead of leaving the other nodes hanging in a collective). Each task runs `accelerate launch`
#      with --machine_rank "$SLURM_NODEID" -- the per-node script is a single-quoted here-doc, so that
#      variable expands inside each task, never once in this batch shell (where it would be 0 for all);
#   4. on SIGUSR1 (sbatch --signal=B:USR1@<grace>, or `scancel --signal=USR1 --batch <job>`) forwards
#      the signal to the training processes; they save a checkpoint at the next step boundary and exit
#      75 (distthink.train REQUEUE_EXIT_CODE). The launcher then runs `scontrol requeue`; the requeued
#      job (same id, SLURM_RESTART_COUNT+1) resumes from checkpoints/latest (checkpoint.resume=auto).
#
# Settings (environment variables; each template sets its defaults at the top):
#   DISTTHINK_CONFIG             run config YAML; empty = the embedded default run
#   DISTTHINK_OVERRIDES          extra key=value overrides, space separated (e.g. "train.lr=1e-4 lora.r=16")
#   DISTTHINK_OUTPUT_DIR         train.output_dir (default: the config's own). Must stay the same across
#                                requeues: that is where `latest` is found.
#   DISTTHINK_GPUS_PER_NODE      processes per node on GPU nodes (default: $SLURM_GPUS_ON_NODE; 0 = CPU)
#   DISTTHINK_CPU_PROCS_PER_NODE processes per node when the node has no GPU (default 1; gloo, DS_ACCELERATOR=cpu)
#   DISTTHINK_ACCELERATE_CONFIG  accelerate config file (default configs/accelerate/multi_node.yaml)
#   DISTTHINK_MODULE             python module to launch (default distthink.train)
#   DISTTHINK_MASTER_PORT        rendezvous port (default: a free port of the head node, else
#                                20000 + job id % 20000)
#   DISTTHINK_NCCL_IFNAME        network interface for NCCL and gloo (NCCL_SOCKET_IFNAME/GLOO_SOCKET_IFNAME)
#   DISTTHINK_SETUP              shell code run first in the batch shell and on every node
#                                (e.g. "module load cuda/12.4; source ~/venvs/distthink/bin/activate")
#   DISTTHINK_SRUN_ARGS          extra srun arguments, e.g. a container (pyxis): "--container-image=... --container-mounts=..."
#   DISTTHINK_NODE_WRAPPER       command that runs the per-node script, e.g. a container runtime:
#                                "apptainer exec --nv /path/img.sif" (signals still reach the script)
#   DISTTHINK_LOG_DIR            per-node logs (default <output dir>/logs): job<id>-node<N>.log
#   DISTTHINK_MAX_REQUEUES       do not requeue after this many restarts (default 20)
#   DISTTHINK_DRY_RUN=1          print the plan and the per-node command, start nothing
set -uo pipefail

dt_log() { echo "[distthink $(date -u +%H:%M:%S)] $*"; }
dt_fail() { echo "[distthink] error: $*" >&2; exit 2; }

# A signal may come before training starts (a short --time with --signal=B:USR1@<grace>, a slow start-up):
# without a handler it would kill this shell and the job would end without a requeue. Remember it; USR1
# then requeues the job before anything starts (nothing new to save), TERM stops it.
preempt=""
signal_before_start() {
    preempt=$1
    dt_log "received SIG$1 before training started"
    [ "$1" = TERM ] && exit 143
}
trap 'signal_before_start USR1' USR1
trap 'signal_before_start TERM' TERM

eval "${DISTTHINK_SETUP:-}"

[ -n "${SLURM_JOB_ID:-}" ] || dt_fail "not inside a SLURM job. Fix: submit with sbatch (or render with \`distthink slurm render\` and sbatch the result)"
: "${SLURM_NNODES:=1}"
: "${DISTTHINK_MODULE:=distthink.train}"
: "${DISTTHINK_ACCELERATE_CONFIG:=configs/accelerate/multi_node.yaml}"
: "${DISTTHINK_MAX_REQUEUES:=20}"
: "${DISTTHINK_OVERRIDES:=}"
: "${DISTTHINK_CONFIG:=}"
export DISTTHINK_MODULE DISTTHINK_ACCELERATE_CONFIG DISTTHINK_OVERRIDES DISTTHINK_CONFIG
export SLURM_RESTART_COUNT="${SLURM_RESTART_COUNT:-0}"

dt_log "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-?}) restart $SLURM_RESTART_COUNT on $SLURM_NNODES node(s): ${SLURM_JOB_NODELIST:-?}"

# -- checks that would otherwise fail later on every node -----------------------------------------
export DISTTHINK_ROOT="${DISTTHINK_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
command -v python >/dev/null || dt_fail "python is not on PATH. Fix: activate the environment before sbatch, or set DISTTHINK_SETUP"
if [ -n "$DISTTHINK_CONFIG" ] && [ ! -f "$DISTTHINK_CONFIG" ]; then
    dt_fail "DISTTHINK_CONFIG=$DISTTHINK_CONFIG does not exist (cwd $(pwd)). Fix: pass an existing YAML, relative to the directory you run sbatch from"
fi
case "$DISTTHINK_ACCELERATE_CONFIG" in
    /*) ;;
    *) if [ -f "$DISTTHINK_ACCELERATE_CONFIG" ]; then DISTTHINK_ACCELERATE_CONFIG="$(pwd)/$DISTTHINK_ACCELERATE_CONFIG"
       elif [ -f "$DISTTHINK_ROOT/$DISTTHINK_ACCELERATE_CONFIG" ]; then DISTTHINK_ACCELERATE_CONFIG="$DISTTHINK_ROOT/$DISTTHINK_ACCELERATE_CONFIG"; fi ;;
esac
[ -f "$DISTTHINK_ACCELERATE_CONFIG" ] || dt_fail "DISTTHINK_ACCELERATE_CONFIG=$DISTTHINK_ACCELERATE_CONFIG not found (looked in $(pwd) and $DISTTHINK_ROOT). Fix: pass an existing accelerate YAML, e.g. configs/accelerate/multi_node.yaml"
# Validate the config (and read its output_dir) with the same code the trainer uses.
read_output_dir='
import sys
from distthink.config import load_config
from distthink.errors import DistthinkError
try:
    cfg = load_config(sys.argv[1] or None, sys.argv[2:])
except DistthinkError as err:
    print(f"config error: {err}", file=sys.stderr)
    sys.exit(2)
print(cfg.train.output_dir)'
# shellcheck disable=SC2086  # overrides are space separated on purpose
config_output_dir=$(python -c "$read_output_dir" "$DISTTHINK_CONFIG" $DISTTHINK_OVERRIDES) \
    || dt_fail "the run config does not load (message above). Nothing was started."
export DISTTHINK_OUTPUT_DIR="${DISTTHINK_OUTPUT_DIR:-$config_output_dir}"
export DISTTHINK_LOG_DIR="${DISTTHINK_LOG_DIR:-$DISTTHINK_OUTPUT_DIR/logs}"
mkdir -p "$DISTTHINK_LOG_DIR" || dt_fail "cannot create the log dir $DISTTHINK_LOG_DIR"

# -- processes per node, device, communication ----------------------------------------------------
export DISTTHINK_GPUS_PER_NODE="${DISTTHINK_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}"
if [ "$DISTTHINK_GPUS_PER_NODE" -gt 0 ]; then
    export DISTTHINK_PROCS_PER_NODE="$DISTTHINK_GPUS_PER_NODE"
    # A rank that hits an NCCL error or timeout aborts (and so ends the step) instead of hanging.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    export NCCL_ASYNC_ERROR_HANDLING="${NCCL_ASYNC_ERROR_HANDLING:-1}"  # name used by torch < 2.2
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
else
    export DISTTHINK_PROCS_PER_NODE="${DISTTHINK_CPU_PROCS_PER_NODE:-1}"
    export DS_ACCELERATOR=cpu      # DeepSpeed must not look for CUDA; the trainer picks gloo on CPU
    export CUDA_VISIBLE_DEVICES=""
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
if [ -n "${DISTTHINK_NCCL_IFNAME:-}" ]; then
    export NCCL_SOCKET_IFNAME="$DISTTHINK_NCCL_IFNAME" GLOO_SOCKET_IFNAME="$DISTTHINK_NCCL_IFNAME"
fi
export DISTTHINK_NUM_PROCESSES=$((SLURM_NNODES * DISTTHINK_PROCS_PER_NODE))

# -- rendezvous ----------------------------------------------------------------------------------
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
[ -n "$head_node" ] || dt_fail "scontrol show hostnames '$SLURM_JOB_NODELIST' returned nothing"
# NodeAddr is what the nodes reach each other by (often the node name itself).
head_addr=$(scontrol show node "$head_node" -o 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
export DISTTHINK_MASTER_ADDR="${DISTTHINK_MASTER_ADDR:-${head_addr:-$head_node}}"
if [ -z "${DISTTHINK_MASTER_PORT:-}" ]; then
    # A free port when this batch shell runs on the head node (the usual case: the batch host is the
    # first node of the allocation); otherwise one derived from the job id.
    if [ "${SLURMD_NODENAME:-}" = "$head_node" ]; then
        DISTTHINK_MASTER_PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
    fi
    DISTTHINK_MASTER_PORT="${DISTTHINK_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
fi
export DISTTHINK_MASTER_PORT
dt_log "rendezvous ${DISTTHINK_MASTER_ADDR}:${DISTTHINK_MASTER_PORT} (head node $head_node); $SLURM_NNODES node(s) x $DISTTHINK_PROCS_PER_NODE process(es) = $DISTTHINK_NUM_PROCESSES; $([ "$DISTTHINK_GPUS_PER_NODE" -gt 0 ] && echo "GPU, NCCL" || echo "CPU, gloo")"
dt_log "config ${DISTTHINK_CONFIG:-<embedded default>}; output dir $DISTTHINK_OUTPUT_DIR; node logs $DISTTHINK_LOG_DIR/job${SLURM_JOB_ID}-node<N>.log"

# -- the per-node script: runs once per node, inside srun. Single-quoted: NOTHING expands here. ------
read -r -d '' DISTTHINK_NODE_SCRIPT <<'NODE_SCRIPT'
set -uo pipefail
eval "${DISTTHINK_SETUP:-}"
echo "[distthink node $SLURM_NODEID/$SLURM_NNODES] host $(hostname -s) (slurm node ${SLURMD_NODENAME:-?}) restart ${SLURM_RESTART_COUNT:-0} machine_rank=$SLURM_NODEID"
if [ "$DISTTHINK_NUM_PROCESSES" -gt 1 ]; then
    command -v accelerate >/dev/null || { echo "[distthink node $SLURM_NODEID] error: accelerate not on PATH on $(hostname -s)" >&2; exit 2; }
    launch=(accelerate launch --config_file "$DISTTHINK_ACCELERATE_CONFIG"
            --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID"
            --num_processes "$DISTTHINK_NUM_PROCESSES"
            --main_process_ip "$DISTTHINK_MASTER_ADDR" --main_process_port "$DISTTHINK_MASTER_PORT")
    if [ "$SLURM_NNODES" -gt 1 ]; then
        # c10d rendezvous on the head node (same_network=false makes accelerate pass rdzv_endpoint).
        # Node 0 hosts the rendezvous store, explicitly: torch would otherwise guess from hostnames and
        # can pick the wrong node when several nodes share a host (containers, test clusters).
        is_host=false; [ "$SLURM_NODEID" = 0 ] && is_host=true
        launch+=(--rdzv_backend c10d --rdzv_conf "join_timeout=600,is_host=$is_host")
        if grep -q 'distributed_type: *DEEPSPEED' "$DISTTHINK_ACCELERATE_CONFIG" 2>/dev/null; then
            launch+=(--deepspeed_multinode_launcher standard)  # not pdsh: srun already put us on every node
        fi
    fi
    launch+=(-m "$DISTTHINK_MODULE")
else
    launch=(python -m "$DISTTHINK_MODULE")
fi
[ -n "$DISTTHINK_CONFIG" ] && launch+=(--config "$DISTTHINK_CONFIG")
# shellcheck disable=SC2206  # overrides are space separated on purpose
launch+=("train.output_dir=$DISTTHINK_OUTPUT_DIR" "checkpoint.resume=auto" $DISTTHINK_OVERRIDES)
echo "[distthink node $SLURM_NODEID] ${launch[*]}"
[ "${DISTTHINK_DRY_RUN:-0}" = 1 ] && exit 0
# The launcher process (accelerate = torchrun agent) must outlive a TERM/USR1 so that it waits while
# the workers save: start it with both ignored (inherited through exec; the trainer installs its own
# handlers) and tell torchelastic not to handle TERM itself (PET_ is torchrun's env form of
# --signals_to_handle, which overwrites TORCHELASTIC_SIGNALS_TO_HANDLE in recent torch).
export TORCHELASTIC_SIGNALS_TO_HANDLE="SIGINT,SIGHUP,SIGQUIT" PET_SIGNALS_TO_HANDLE="SIGINT,SIGHUP,SIGQUIT"
trap '' TERM USR1
status_file="$DISTTHINK_OUTPUT_DIR/exit_status.json"
rm -f "$status_file" 2>/dev/null  # what the ranks write this time (distthink.engine.exit_status)
"${launch[@]}" &
agent=$!
preempted=0
forward() {  # to the training processes: the agent's children (or the single process itself)
    [ "$1" = USR1 ] && preempted=1
    echo "[distthink node $SLURM_NODEID] SIG$1: asking the training processes to save and stop at the next step"
    if [ "$DISTTHINK_NUM_PROCESSES" -gt 1 ]; then pkill "-$1" -P "$agent"; else kill "-$1" "$agent"; fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
while kill -0 "$agent" 2>/dev/null; do wait "$agent"; done
wait "$agent"; rc=$?
# The agent reports any failed worker as 1: the ranks' own exit code is what rank 0 wrote in exit_status.json
# (75 = saved after a preemption request: requeue; 2 = user error; 3 = NaN stop). Without the file (a rank
# died before writing it), a USR1 we forwarded still means preempted.
# A TERM is not a preemption request here: srun sends it to the other nodes when one task fails.
written=$(sed -n 's/.*"exit_code": *\([0-9]*\).*/\1/p' "$status_file" 2>/dev/null)
if [ "$rc" -ne 0 ] && [ -n "$written" ] && [ "$written" -ne 0 ]; then rc=$written; fi
if [ "$preempted" = 1 ] && [ "$rc" -ne 0 ] && [ -z "$written" ]; then rc=75; fi
echo "[distthink node $SLURM_NODEID] training processes ended with exit code $rc"
exit "$rc"
NODE_SCRIPT
export DISTTHINK_NODE_SCRIPT

if [ "${DISTTHINK_DRY_RUN:-0}" = 1 ]; then
    dt_log "DISTTHINK_DRY_RUN=1: per-node commands only"
fi

# -- run: one task per node; USR1/TERM forwarded to it --------------------------------------------
srun_args=(--nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1
           --output="$DISTTHINK_LOG_DIR/job%j-node%n.log" --open-mode=append)
# The one task per node gets every CPU of the node (not the 1 CPU of a default task).
[ -n "${SLURM_CPUS_ON_NODE:-}" ] && srun_args+=(--cpus-per-task="$SLURM_CPUS_ON_NODE")
latest_file="$DISTTHINK_OUTPUT_DIR/checkpoints/latest"
latest_before=$(cat "$latest_file" 2>/dev/null || echo none)
dt_log "resuming from: $latest_before (checkpoint.resume=auto)"
on_signal() {
    preempt=$1
    dt_log "received SIG$1: forwarding it to every node; training saves at the next step boundary"
    [ -n "${srun_pid:-}" ] && kill "-$1" "$srun_pid" 2>/dev/null
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
if [ "$preempt" = USR1 ]; then
    rc=75  # asked to stop before anything started: requeue below; the next launch resumes from $latest_before
else
    # shellcheck disable=SC2086  # DISTTHINK_SRUN_ARGS / DISTTHINK_NODE_WRAPPER are word lists on purpose
    srun "${srun_args[@]}" ${DISTTHINK_SRUN_ARGS:-} ${DISTTHINK_NODE_WRAPPER:-} bash -c "$DISTTHINK_NODE_SCRIPT" &
    srun_pid=$!
    while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; done
    wait "$srun_pid"; rc=$?
fi
latest=$(cat "$latest_file" 2>/dev/null || echo none)

if [ "$rc" -eq 0 ]; then
    dt_log "training finished (exit code 0); latest checkpoint: $latest"
    exit 0
fi
if [ "$rc" -eq 75 ] || [ "$preempt" = USR1 ]; then
    if [ "$SLURM_RESTART_COUNT" -ge "$DISTTHINK_MAX_REQUEUES" ]; then
        dt_log "preempted after $SLURM_RESTART_COUNT restarts (DISTTHINK_MAX_REQUEUES=$DISTTHINK_MAX_REQUEUES): not requeueing. Resume by hand: submit again with DISTTHINK_OUTPUT_DIR=$DISTTHINK_OUTPUT_DIR"
        exit 75
    fi
    if [ -z "${srun_pid:-}" ]; then
        dt_log "preempted before training started: requeueing job $SLURM_JOB_ID (restart $((SLURM_RESTART_COUNT + 1))), it resumes from $latest"
    else
        if [ "$latest" = "$latest_before" ]; then
            dt_log "warning: preempted but no new checkpoint was written (latest is still $latest): the requeued job repeats the steps since then"
        fi
        dt_log "preempted: training saved $latest and stopped (exit code $rc); requeueing job $SLURM_JOB_ID (restart $((SLURM_RESTART_COUNT + 1))), it resumes from $latest_file"
    fi
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        dt_log "error: scontrol requeue failed (the job must be submitted with --requeue and the cluster allow JobRequeue). Resume by hand: submit again with DISTTHINK_OUTPUT_DIR=$DISTTHINK_OUTPUT_DIR"
        exit 75
    fi
    exit 0
fi
if [ "$preempt" = TERM ]; then
    dt_log "stopped by SIGTERM (scancel, time limit, or preemption by the scheduler) with exit code $rc; latest checkpoint: $latest. SLURM requeues only if it preempted the job with PreemptMode=REQUEUE; otherwise resubmit with DISTTHINK_OUTPUT_DIR=$DISTTHINK_OUTPUT_DIR"
    exit "$rc"
fi
dt_log "error: training failed (srun exit code $rc). A node's task that fails ends all of them (--kill-on-bad-exit=1). Last lines of each node log:"
for f in "$DISTTHINK_LOG_DIR"/job"${SLURM_JOB_ID}"-node*.log; do
    [ -f "$f" ] || continue
    echo "----- $f"
    tail -n 15 "$f"
done
exit "$rc"
