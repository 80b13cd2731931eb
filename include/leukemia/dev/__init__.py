"""Development tools: the local stack, the demo and synthetic data; not used by production code paths.

`embedded` runs moto's S3 server on loopback and points Airflow at it, `demo` runs the whole training
DAG on that stack (`make demo`) and `progress` turns `airflow dags test` output into a few lines,
`synthetic` writes seeded synthetic smears for the tests and the demo. `stack` runs the production
stack on one machine from `processes`, `services`, `airflow_settings` (shared with
docker-compose.yaml), `airflow_rest`, `sharenothing` and `hostfence`.
The DAGs and the library's production modules never import this package (tests/test_layout.py).
"""
