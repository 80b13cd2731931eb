#!/usr/bin/env bash
# The stack's two databases, each owned by a login role of its own that has no other rights:
#   AIRFLOW_DB_NAME  owned by AIRFLOW_DB_USER  Airflow's metadata; the Airflow containers log in as it
#   MLFLOW_DB_NAME   owned by MLFLOW_DB_USER   MLflow's backend store; the mlflow server logs in as it
# Neither role may connect to the other's database. The superuser (POSTGRES_USER) stays in the
# postgres container: no other service holds its password.
#
# The postgres image runs the files of /docker-entrypoint-initdb.d once, when the data volume is
# empty. The script is idempotent, so it also upgrades an existing volume: it (re)sets both roles'
# passwords from the environment and hands each database, with every table, view, sequence and
# type of its public schema, to its role (docs/production.md, "Stacks created before"):
#   docker compose exec postgres bash /docker-entrypoint-initdb.d/10-databases.sh
# Names and passwords come from the postgres service's environment (.env.example); psql variables
# (:"name" for identifiers, :'value' for literals) quote them safely.
set -euo pipefail

fail() {
    printf 'postgres-init: %s\n' "$1" >&2
    exit 1
}

for name in POSTGRES_USER AIRFLOW_DB_USER AIRFLOW_DB_PASSWORD AIRFLOW_DB_NAME \
    MLFLOW_DB_USER MLFLOW_DB_PASSWORD MLFLOW_DB_NAME; do
    [ -n "${!name-}" ] || fail "$name is not set: set it in .env (see .env.example)"
done
[ "$AIRFLOW_DB_USER" != "$MLFLOW_DB_USER" ] ||
    fail "AIRFLOW_DB_USER and MLFLOW_DB_USER are both '$AIRFLOW_DB_USER': each database needs its own role"

# database OWNER PASSWORD NAME: the login role OWNER, with password PASSWORD and no other rights,
# owns database NAME and what its public schema holds; only OWNER and the superuser may connect.
database() {
    [ "$1" != "$POSTGRES_USER" ] ||
        fail "'$1' is the superuser POSTGRES_USER; give the database a role of its own (e.g. ${1}_app)"
    psql -v ON_ERROR_STOP=1 --quiet --username "$POSTGRES_USER" --dbname postgres \
        -v owner="$1" -v password="$2" -v db="$3" <<'SQL'
SELECT format('CREATE ROLE %I', :'owner')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'owner') \gexec
ALTER ROLE :"owner" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    PASSWORD :'password';
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'owner')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
ALTER DATABASE :"db" OWNER TO :"owner";
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
\connect :"db"
-- A volume made before the roles existed: its tables belong to the superuser. Sequences that
-- belong to a column (serial, identity) follow their table.
SELECT format('ALTER %s %I.%I OWNER TO %I',
              CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                             WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END,
              n.nspname, c.relname, :'owner')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
  AND pg_get_userbyid(c.relowner) <> :'owner'
  AND NOT EXISTS (SELECT FROM pg_depend d
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                    AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')) \gexec
SELECT format('ALTER %s %I.%I OWNER TO %I',
              CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END,
              n.nspname, t.typname, :'owner')
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE n.nspname = 'public' AND t.typtype IN ('e', 'd', 'r')
  AND pg_get_userbyid(t.typowner) <> :'owner' \gexec
SQL
    echo "postgres-init: database $3 owned by $1"
}

database "$AIRFLOW_DB_USER" "$AIRFLOW_DB_PASSWORD" "$AIRFLOW_DB_NAME"
database "$MLFLOW_DB_USER" "$MLFLOW_DB_PASSWORD" "$MLFLOW_DB_NAME"
