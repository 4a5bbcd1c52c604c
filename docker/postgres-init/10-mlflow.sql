-- The MLflow tracking server's database, next to the training store (POSTGRES_DB=flywheel).
-- Runs once, when the PostgreSQL volume is first initialised.
CREATE DATABASE mlflow OWNER flywheel;
