#!/usr/bin/env bash
# Delete the slice (stops the billing). Usage: launch/delete.sh [--queued]   (--queued: made by create.sh --queued)
source "$(dirname "$0")/common.sh"
if [ "${1:-}" = "--queued" ]; then
  gcloud compute tpus queued-resources delete "$TPU_NAME" --force --quiet --zone="$ZONE" --project="$PROJECT"
else
  gtpu delete "$TPU_NAME" --quiet
fi
