#!/usr/bin/env bash
# Creates MLflow's backend database and its owner next to Airflow's metadata database.
# The postgres image runs the files of /docker-entrypoint-initdb.d once, when the data volume is
# empty; to re-run it, remove the volume (`docker compose down -v` deletes ALL data).
# The names and password come from the postgres service's environment (see .env.example); psql
# variables (:"name" for identifiers, :'value' for literals) quote them safely.
set -euo pipefail

: "${MLFLOW_DB_USER:?MLFLOW_DB_USER is not set}"
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set}"
: "${MLFLOW_DB_NAME:?MLFLOW_DB_NAME is not set}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v db="$MLFLOW_DB_NAME" -v owner="$MLFLOW_DB_USER" -v password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE :"owner" WITH LOGIN PASSWORD :'password';
CREATE DATABASE :"db" OWNER :"owner";
SQL

echo "created database ${MLFLOW_DB_NAME} owned by ${MLFLOW_DB_USER}"
