# Airflow image of the production stack (docker-compose.yaml builds it as leukemia-airflow:3.3.2).
# The official image plus the project's pinned dependencies, installed with the project's one
# install command (the same as in the README and the Makefile).
FROM apache/airflow:3.3.2-python3.11

# The base image runs as `airflow`; pip installs into its user site, as the image's docs advise.
USER airflow
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONPATH=/opt/airflow/include:/opt/airflow

WORKDIR /opt/airflow
# Each container's own cache folder (LEUKEMIA_DATA_DIR, KERAS_HOME below it): compose mounts an
# anonymous volume here, which starts as a copy of this folder, writable by group 0 as the
# containers' user (AIRFLOW_UID:0) needs.
RUN mkdir -p /opt/airflow/data/keras && chmod -R g+rwX /opt/airflow/data
COPY --chown=airflow:0 requirements.txt constraints.txt ./
RUN pip install -r requirements.txt -c constraints.txt

# Bake the library and the DAGs into the image so it also runs without bind mounts
# (Kubernetes pods, remote workers). docker-compose.yaml mounts the live folders over them.
COPY --chown=airflow:0 include/ /opt/airflow/include/
COPY --chown=airflow:0 dags/ /opt/airflow/dags/
