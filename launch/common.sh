#!/usr/bin/env bash
# Shared settings for the TPU-VM scripts. Override any of them in the environment.
set -euo pipefail
: "${TPU_NAME:=retro-jax}"
: "${ZONE:=us-east5-a}"                        # a v5p zone; v5e/v6e users pick theirs
: "${ACCELERATOR_TYPE:=v5p-64}"               # 32 chips = 8 hosts x 4 chips
: "${RUNTIME_VERSION:=v2-alpha-tpuv5}"
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${REPO_URL:=}"                              # where the workers clone retro_jax from (required by setup.sh)
: "${REPO_REF:=main}"
: "${WORKDIR:=\$HOME/retro_jax}"
gtpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE" --project="$PROJECT"; }
on_all_workers() { gtpu ssh "$TPU_NAME" --worker=all --command="$1"; }
