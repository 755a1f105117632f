#!/usr/bin/env bash
# An MLflow tracking server + model registry. Override BACKEND_URI / ARTIFACT_ROOT for a team.
set -euo pipefail
ROOT=${MLFLOW_ROOT:-$PWD/mlflow_server}
mkdir -p "$ROOT"
BACKEND_URI=${BACKEND_URI:-sqlite:///$ROOT/mlflow.db}
ARTIFACT_ROOT=${ARTIFACT_ROOT:-$ROOT/artifacts}
# tracking and the registry only: no runners for MLflow's server-side (GenAI) jobs, which start
# pools of worker processes this project never uses
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
exec mlflow server --backend-store-uri "$BACKEND_URI" --artifacts-destination "$ARTIFACT_ROOT" \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-5000}"
