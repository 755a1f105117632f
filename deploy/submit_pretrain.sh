#!/usr/bin/env bash
# Submit a leave-datasets-out evaluation (pretrain + fine-tune + report) as a Ray job.
# RAY_ADDRESS points at the cluster's dashboard; RAY_AUTH_MODE must match the cluster's.
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS=http://HEAD:8265}"
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
cd "$(dirname "$0")/.."
exec ray job submit --working-dir . --runtime-env-json '{"excludes": [".venv", "scpretrain_work"], "env_vars": {"MALLOC_ARENA_MAX": "2"}}' -- \
  scpretrain evaluate --protocol lodo --set ray.address=auto "$@"
