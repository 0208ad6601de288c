#!/usr/bin/env bash
# Clone retro_jax on every worker and install it with JAX for TPU. Usage: REPO_URL=... launch/setup.sh
source "$(dirname "$0")/common.sh"
[ -n "$REPO_URL" ] || { echo "set REPO_URL to a git URL the workers can clone" >&2; exit 2; }
on_all_workers "set -e; rm -rf $WORKDIR; git clone --depth 1 --branch $REPO_REF $REPO_URL $WORKDIR; \
  cd $WORKDIR && pip install -q -U 'jax[tpu]' && pip install -q -e '.[hf]'"
