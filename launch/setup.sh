#!/usr/bin/env bash
# Clone retro_jax on every worker and install it with jax[tpu]==$JAX_VERSION (the tested jax).
# Usage: REPO_URL=... launch/setup.sh [--mount gs://BUCKET /mnt/DIR]   (--mount: gcsfuse, the same path on all hosts)
source "$(dirname "$0")/common.sh"
[ -n "$REPO_URL" ] || { echo "set REPO_URL to a git URL the workers can clone" >&2; exit 2; }
mount=""
if [ "${1:-}" = "--mount" ]; then
  [ $# -eq 3 ] || { echo "usage: launch/setup.sh --mount gs://BUCKET /mnt/DIR" >&2; exit 2; }
  bucket=${2#gs://}
  mount="; sudo mkdir -p $3 && sudo chown \$USER $3 && (command -v gcsfuse >/dev/null || (sudo apt-get update -q \
    && sudo apt-get install -y -q gcsfuse)) && gcsfuse --implicit-dirs $bucket $3"
fi
on_all_workers "set -e; rm -rf $WORKDIR; git clone --depth 1 --branch $REPO_REF $REPO_URL $WORKDIR; \
  cd $WORKDIR && pip install -q 'jax[tpu]==$JAX_VERSION' && pip install -q -e '.[hf]'$mount"
