# MLflow tracking server for the production stack (docker-compose.yaml, service `mlflow`).
# The upstream image ships MLflow only; the Postgres backend store needs psycopg2 and the
# S3 (MinIO) artifact store needs boto3. Versions pinned like the rest of the project: keep the
# MLflow tag equal to the mlflow pin in requirements.txt and boto3 equal to constraints.txt.
FROM ghcr.io/mlflow/mlflow:v3.17.2

RUN pip install --no-cache-dir psycopg2-binary==2.9.13 boto3==1.44.8

EXPOSE 5000
