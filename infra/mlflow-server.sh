#!/bin/sh
# MLflow tracking server + model registry with basic authentication, its runs and
# registry in PostgreSQL, its artifacts proxied to S3. Used by the `mlflow`
# service of infra/docker-compose.yml and, on loopback, by tests/services (so the
# compose file's server is the tested one). Everything comes from the environment:
#   MLFLOW_BACKEND_STORE_URI      postgresql://USER:PASSWORD@HOST:5432/mlflow
#   MLFLOW_AUTH_DATABASE_URI      postgresql://USER:PASSWORD@HOST:5432/mlflow_auth
#   MLFLOW_ARTIFACTS_DESTINATION  s3://mlflow/artifacts
#   MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD  (the admin user,
#                                 created on first start; read by MLflow itself)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  (CSRF secret of the auth app)
#   AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / MLFLOW_S3_ENDPOINT_URL  (S3)
#   MLFLOW_HOST (0.0.0.0), MLFLOW_PORT (5000), MLFLOW_WORKERS (2),
#   MLFLOW_ALLOWED_HOSTS (the Host headers to accept; MLflow's default otherwise)
set -eu
missing=""
for name in MLFLOW_BACKEND_STORE_URI MLFLOW_AUTH_DATABASE_URI \
    MLFLOW_ARTIFACTS_DESTINATION MLFLOW_AUTH_ADMIN_PASSWORD \
    MLFLOW_FLASK_SERVER_SECRET_KEY; do
  eval "value=\${$name:-}"
  [ -n "$value" ] || missing="$missing $name"
done
if [ -n "$missing" ]; then
  echo "mlflow-server.sh: set$missing (infra/.env.example lists them)" >&2
  exit 2
fi
# the auth app reads its database from an ini file: written here, readable by
# this user only (it holds the database password)
umask 077
config="$(mktemp -d)/basic_auth.ini"
cat > "$config" <<INI
[mlflow]
default_permission = READ
database_uri = $MLFLOW_AUTH_DATABASE_URI
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$config"
set -- --app-name basic-auth \
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-2}" \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" --serve-artifacts
if [ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]; then
  set -- "$@" --allowed-hosts "$MLFLOW_ALLOWED_HOSTS"
fi
exec mlflow server "$@"
