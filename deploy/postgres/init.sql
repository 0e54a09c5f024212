-- Runs once as the superuser, when the PostgreSQL volume is created (compose mounts it into
-- /docker-entrypoint-initdb.d); on your own PostgreSQL run it once with
--   MLFLOW_DB_PASSWORD=... OPTUNA_DB_PASSWORD=... psql -h HOST -U postgres -v ON_ERROR_STOP=1 -f deploy/postgres/init.sql
-- One role per client, each owning only its own databases and holding no superuser, CREATEDB
-- or CREATEROLE right: `mlflow` (the tracking store and the basic-auth user store, used only by
-- the tracking server) and `optuna` (the shared study storage, used by tuning and training).
-- The passwords are read from the environment (psql's \getenv), never written here.
\set ON_ERROR_STOP on
\getenv mlflow_db_password MLFLOW_DB_PASSWORD
\getenv optuna_db_password OPTUNA_DB_PASSWORD
\if :{?mlflow_db_password} \else \set mlflow_db_password '' \endif
\if :{?optuna_db_password} \else \set optuna_db_password '' \endif
SELECT :'mlflow_db_password' = '' OR :'optuna_db_password' = '' AS missing_password \gset
\if :missing_password
  DO $$ BEGIN RAISE EXCEPTION 'set MLFLOW_DB_PASSWORD and OPTUNA_DB_PASSWORD'; END $$;
\endif

CREATE ROLE mlflow LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'mlflow_db_password';
CREATE ROLE optuna LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'optuna_db_password';
\unset mlflow_db_password
\unset optuna_db_password

CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
CREATE DATABASE optuna OWNER optuna;
-- Nobody else may even connect: optuna cannot read the tracking store, mlflow cannot read studies.
REVOKE ALL ON DATABASE mlflow, mlflow_auth, optuna FROM PUBLIC;
