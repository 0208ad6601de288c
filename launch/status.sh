#!/usr/bin/env bash
# The slice's state (and the queued resource's, if any), and which runs are alive on each worker.
# Usage: launch/status.sh
source "$(dirname "$0")/common.sh"
gtpu describe "$TPU_NAME" --format="value(state,health,acceleratorType)" || \
  gcloud compute tpus queued-resources describe "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --format="value(state)"
on_all_workers "for p in $RUNS_DIR/*/worker-*.pid; do [ -e \"\$p\" ] || continue; \
  if kill -0 \$(cat \$p) 2>/dev/null; then echo \"running \$p\"; else echo \"ended   \$p\"; fi; done"
