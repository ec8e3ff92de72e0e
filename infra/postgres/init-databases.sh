#!/usr/bin/env bash
# Runs once, when the postgres image starts on an empty data volume (/docker-entrypoint-initdb.d):
# a login role and a database each for Prefect and MLflow, so neither service can touch the other's tables.
# Passwords come from the environment and reach SQL only as psql variables (:'name' quotes them as
# literals), so no character in a password can break or extend a statement.
set -euo pipefail

: "${PREFECT_DB_PASSWORD:?PREFECT_DB_PASSWORD is not set}"
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set}"

psql -v ON_ERROR_STOP=1 \
  --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
  -v prefect_password="$PREFECT_DB_PASSWORD" \
  -v mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE DATABASE prefect OWNER prefect;
REVOKE ALL ON DATABASE prefect FROM PUBLIC;

CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;

-- Prefect's migrations create pg_trgm; doing it here as the superuser keeps that working even where
-- the extension is not marked trusted.
\connect prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
SQL
