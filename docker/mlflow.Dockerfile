# MLflow tracking server for the production stack (docker-compose.yaml, services `mlflow` and
# `mlflow-init`). The upstream image ships MLflow only; the Postgres backend store needs psycopg2,
# the S3 (MinIO) artifact store boto3, and the basic-auth app (`--app-name basic-auth`) Flask-WTF.
# Versions pinned like the rest of the project: keep the MLflow tag equal to the mlflow pin in
# requirements.txt, and boto3 and Flask-WTF equal to constraints.txt.
FROM ghcr.io/mlflow/mlflow:v3.17.2

RUN pip install --no-cache-dir psycopg2-binary==2.9.13 boto3==1.44.8 Flask-WTF==1.3.0 WTForms==3.3.2

# The upstream image runs as root; the server needs no more than its user store (the mlflow-auth
# volume at /var/lib/mlflow-auth, handed to this user by the volume-init job) and a home folder.
# A numeric USER so that Kubernetes' runAsNonRoot can check it; 10001 matches no host account.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/mlflow --shell /usr/sbin/nologin mlflow \
    && install -d -o 10001 -g 10001 -m 700 /var/lib/mlflow-auth
USER 10001:10001
WORKDIR /home/mlflow

EXPOSE 5000
