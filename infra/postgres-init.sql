-- One PostgreSQL server, one database per service (docker-compose.yml runs this once).
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
