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
: "${JAX_VERSION:=0.10.2}"                     # the jax retro_jax was tested with; setup.sh installs jax[tpu] of it
: "${WORKDIR:=\$HOME/retro_jax}"               # the checkout on each worker
: "${RUNS_DIR:=\$HOME/retro_jax_runs}"         # per-run logs and pids on each worker
gtpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE" --project="$PROJECT"; }
on_workers() { gtpu ssh "$TPU_NAME" --worker="$1" --command="$2"; }
on_all_workers() { on_workers all "$1"; }
