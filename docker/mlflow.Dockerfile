# MLflow tracking server for the production stack (docker-compose.yaml, services `mlflow` and
# `mlflow-init`). The upstream image ships MLflow only; the Postgres backend store needs psycopg2,
# the S3 (MinIO) artifact store boto3, and the basic-auth app (`--app-name basic-auth`) Flask-WTF.
# Versions pinned like the rest of the project: keep the MLflow tag equal to the mlflow pin in
# requirements.txt, and boto3 and Flask-WTF equal to constraints.txt.
FROM ghcr.io/mlflow/mlflow:v3.17.2

RUN pip install --no-cache-dir psycopg2-binary==2.9.13 boto3==1.44.8 Flask-WTF==1.3.0 WTForms==3.3.2

EXPOSE 5000
