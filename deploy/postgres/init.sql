-- Runs once, when the PostgreSQL volume is created: the tracking store (mlflow, created by the
-- image from POSTGRES_DB), the basic-auth user store and the shared Optuna study storage.
CREATE DATABASE mlflow_auth;
CREATE DATABASE optuna;
