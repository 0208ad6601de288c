#!/usr/bin/env bash
# Create the TPU VM (all hosts of the slice). Usage: TPU_NAME=... ACCELERATOR_TYPE=v5p-64 launch/create.sh
source "$(dirname "$0")/common.sh"
gtpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "$@"
