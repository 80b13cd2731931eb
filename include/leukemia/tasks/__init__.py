"""The Airflow edge: what each DAG task calls (one module per DAG), its assets and shared Params.

DAG files read their Params once into typed values and call one function here per task; these
functions call the library below them and return small dicts for XCom. Nothing below this package
knows of Airflow's Params or context.
"""
