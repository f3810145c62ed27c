-- the MLflow database is created by POSTGRES_DB; Prefect and MLflow's
-- authentication store get their own
CREATE DATABASE prefect;
CREATE DATABASE mlflow_auth;
