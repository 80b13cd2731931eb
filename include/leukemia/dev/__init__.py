"""Development tools: the local stack, the demo and synthetic data; not used by production code paths.

`embedded` runs moto's S3 server on loopback and points Airflow at it, `demo` runs the whole training
DAG on that stack (`make demo`), `synthetic` writes seeded synthetic smears for the tests and the demo.
The DAGs and the library's production modules never import this package (tests/test_layout.py).
"""
