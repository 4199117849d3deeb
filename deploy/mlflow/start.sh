#!/bin/sh
# The suite's MLflow tracking server (docker-compose.yml, service mlflow), run from the manager
# image: runs and the model registry in PostgreSQL, artifacts served by the server itself
# (--serve-artifacts: clients need no storage credentials) from the mlflow-data volume, MLflow's
# basic-auth app (deploy/mlflow/basic_auth.ini) with the admin of .env. One worker, as the
# embedded server: a revoked password stops working at once.
set -eu
: "${MLFLOW_BACKEND_STORE_URI:?set by docker-compose.yml from the POSTGRES_* settings}"
: "${MLFLOW_AUTH_ADMIN_USERNAME:?FLOPS_MLFLOW_ADMIN_USERNAME is not set in .env}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?FLOPS_MLFLOW_ADMIN_PASSWORD is not set in .env}"
mkdir -p /var/lib/flops/mlflow/artifacts
# The Flask secret key of the sign-up form's CSRF protection: new at every start.
MLFLOW_FLASK_SERVER_SECRET_KEY="$(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
export MLFLOW_FLASK_SERVER_SECRET_KEY
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
exec python -m mlflow server \
    --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
    --artifacts-destination /var/lib/flops/mlflow/artifacts \
    --serve-artifacts \
    --host 0.0.0.0 \
    --port 5000 \
    --workers 1 \
    --allowed-hosts "${FLOPS_MLFLOW_ALLOWED_HOSTS:-mlflow,mlflow:5000,localhost,localhost:*,127.0.0.1,127.0.0.1:*}" \
    --app-name basic-auth
