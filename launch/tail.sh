#!/usr/bin/env bash
# The last lines of a run's log on one worker (default 0). Usage: launch/tail.sh RUN_ID [WORKER] [LINES]
source "$(dirname "$0")/common.sh"
[ $# -ge 1 ] || { echo "usage: launch/tail.sh RUN_ID [WORKER] [LINES]" >&2; exit 2; }
on_workers "${2:-0}" "tail -n ${3:-50} $RUNS_DIR/$1/worker-*.log"
