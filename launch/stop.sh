#!/usr/bin/env bash
# Stop a run on every worker with SIGTERM: the trainers save a checkpoint at the same step on every host and exit
# (run the same launch/run.sh command again to resume); a rollout keeps every finished record in its shard.
# Usage: launch/stop.sh RUN_ID
source "$(dirname "$0")/common.sh"
[ $# -eq 1 ] || { echo "usage: launch/stop.sh RUN_ID" >&2; exit 2; }
on_all_workers "for p in $RUNS_DIR/$1/worker-*.pid; do [ -e \"\$p\" ] && kill -TERM \$(cat \$p) 2>/dev/null; done; true"
