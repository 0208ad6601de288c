#!/usr/bin/env bash
# Start one retro-jax command on every worker at once (multi-host JAX: every host runs the same program).
# Usage: launch/run.sh [--run-id ID] <retro-jax subcommand> [flags]
# Each worker logs to $RUNS_DIR/ID/worker-<n>.log and keeps the pid in $RUNS_DIR/ID/worker-<n>.pid; see
# launch/tail.sh ID and launch/stop.sh ID. The run id defaults to the subcommand and the time.
source "$(dirname "$0")/common.sh"
run_id=""
if [ "${1:-}" = "--run-id" ]; then run_id=$2; shift 2; fi
[ $# -gt 0 ] || { echo "usage: launch/run.sh [--run-id ID] <retro-jax subcommand> [flags]" >&2; exit 2; }
run_id=${run_id:-$1-$(date -u +%Y%m%d-%H%M%S)}
args=$(printf '%q ' "$@")
# TPU_WORKER_ID is set on every Cloud TPU VM worker; logs of one run sit side by side on shared storage too.
on_all_workers "mkdir -p $RUNS_DIR/$run_id && cd $WORKDIR && w=\${TPU_WORKER_ID:-\$(hostname)} && \
  nohup retro-jax $args > $RUNS_DIR/$run_id/worker-\$w.log 2>&1 < /dev/null & echo \$! > $RUNS_DIR/$run_id/worker-\$w.pid"
echo "run $run_id started on all workers of $TPU_NAME: retro-jax $args"
