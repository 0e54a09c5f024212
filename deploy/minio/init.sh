#!/bin/sh
# Runs once with MinIO's root credentials (the only place they are used besides MinIO itself):
# creates the artifact bucket and the tracking server's own user, whose policy allows only that
# bucket. Every credential comes from the environment; `mc` keeps its config in MC_CONFIG_DIR.
set -eu
: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" "${MINIO_MLFLOW_USER:?}" "${MINIO_MLFLOW_PASSWORD:?}"
endpoint="${MINIO_ENDPOINT:-http://minio:9000}"
bucket=mlflow   # the policy names it too
policy_file="$(dirname "$0")/artifacts-policy.json"
mc alias set local "$endpoint" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "local/$bucket"
mc admin policy create local mlflow-artifacts "$policy_file"
mc admin user add local "$MINIO_MLFLOW_USER" "$MINIO_MLFLOW_PASSWORD" >/dev/null
mc admin policy attach local mlflow-artifacts --user "$MINIO_MLFLOW_USER" 2>/dev/null ||
    mc admin policy entities local --user "$MINIO_MLFLOW_USER" | grep -q mlflow-artifacts
echo "bucket $bucket and user $MINIO_MLFLOW_USER (policy mlflow-artifacts) ready"
