#!/usr/bin/env bash
# Create the TPU slice (every host). Usage: launch/create.sh [--spot] [--queued] [extra gcloud flags]
#   --spot    spot capacity (cheaper, preemptible: the trainers checkpoint on SIGTERM, rollouts resume by shard)
#   --queued  ask through queued resources (waits for capacity instead of failing); check with launch/status.sh
source "$(dirname "$0")/common.sh"
spot=() queued=0 extra=()
for arg in "$@"; do
  case "$arg" in
    --spot) spot=(--spot) ;;
    --queued) queued=1 ;;
    *) extra+=("$arg") ;;
  esac
done
if [ "$queued" = 1 ]; then
  gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" \
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
    --zone="$ZONE" --project="$PROJECT" "${spot[@]}" "${extra[@]}"
else
  gtpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${spot[@]}" \
    "${extra[@]}"
fi
