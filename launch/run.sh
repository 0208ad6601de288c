#!/usr/bin/env bash
# Run one retro-jax command on every worker at once (multi-host JAX needs all hosts to start the same program).
# Usage: launch/run.sh sft --config configs/r1_distill_7b_self_improve.py --config.output_dir=gs://bucket/run1
# Output goes to ~/retro_jax.log on each worker; `launch/run.sh --tail` shows worker 0's log.
source "$(dirname "$0")/common.sh"
if [ "${1:-}" = "--tail" ]; then
  gtpu ssh "$TPU_NAME" --worker=0 --command="tail -n 50 ~/retro_jax.log"; exit
fi
[ $# -gt 0 ] || { echo "usage: launch/run.sh <retro-jax subcommand> [flags]" >&2; exit 2; }
args=$(printf '%q ' "$@")
on_all_workers "cd $WORKDIR && nohup retro-jax $args > ~/retro_jax.log 2>&1 &"
echo "started on all workers of $TPU_NAME: retro-jax $args"
