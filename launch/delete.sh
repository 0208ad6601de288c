#!/usr/bin/env bash
# Delete the TPU VM (stops the billing). Usage: TPU_NAME=... launch/delete.sh
source "$(dirname "$0")/common.sh"
gtpu delete "$TPU_NAME" --quiet
