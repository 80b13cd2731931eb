"""The training DAG on the production stack: CeleryExecutor, two workers that share no disk.

`leukemia.dev.stack` starts PostgreSQL, Redis, moto's S3 server, an MLflow server and Airflow
(scheduler, dag-processor, api-server, two Celery workers, each in its own empty folder behind a
fence) on 127.0.0.1; the run is triggered through the REST API as the UI does it, on synthetic
smears. `make stack-test` runs this module alone (`pytest -m stack`).

Until issue 13's data plane lands (hand-offs through `LEUKEMIA_WORK_URI`, extraction mapped over
`extract_shards`), tasks hand each other paths on the disk of the worker that wrote them: the test
is then an expected failure (xfail), and only for that reason: a run that breaks share-nothing
once the DAG has `extract_shards`, or any other failure of the stack or the run, fails it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from leukemia.config import CLASSES, env
from leukemia.dev.stack import ShareNothingViolation, Stack, open_session, predictions, tiny_conf

pytestmark = [pytest.mark.stack, pytest.mark.slow]

PER_CLASS = 12
RUN_TIMEOUT_S = 600
DATA_PLANE_PENDING = (
    "issue 13 data plane not landed: the served DAG has no extract_shards Param, so tasks still "
    "hand each other local paths under LEUKEMIA_DATA_DIR (sync_images -> build_split -> "
    "extract_features -> train); expected to break share-nothing until it lands"
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole stack, seeded with 12 synthetic 48 px smears per class; stopped whatever happens."""
    with open_session(tmp_path_factory.mktemp("stack"), per_class=PER_CLASS, size=48) as session:
        assert session.images == PER_CLASS * len(CLASSES)
        yield session.stack


def test_training_dag_runs_on_two_celery_workers_that_share_no_disk(stack: Stack) -> None:
    params = stack.dag_params()
    result = stack.run(tiny_conf(params), timeout_s=RUN_TIMEOUT_S, stop_at_first_breach=True)

    # share nothing: no task reached another worker's folder, no XCom names a local file
    breaches = result.share_nothing_report()
    if breaches and "extract_shards" not in params:
        pytest.xfail(f"{DATA_PLANE_PENDING}. This run: " + "; ".join(breaches[:3]))
    if breaches:
        raise ShareNothingViolation("\n".join([*breaches, stack.diagnosis(result)]))
    assert result.state == "success", stack.diagnosis(result)

    # the heavy steps ran on both workers: extraction mapped over shards, the grid's trainings
    workers = {w.name for w in stack.workers}
    extraction = result.of("extract_features")
    assert len(extraction) >= 2 and all(t.map_index >= 0 for t in extraction)
    assert result.hosts("extract_features") == workers, [(t.label, t.hostname) for t in extraction]
    assert len(result.of("train")) == 4
    assert result.hosts("train") == workers, [(t.label, t.hostname) for t in result.of("train")]

    # the champion loads in a third, fresh process (its own empty folder) from the registry
    import mlflow

    champion = mlflow.MlflowClient(tracking_uri=stack.mlflow_url).get_model_version_by_alias(
        env("LEUKEMIA_MODEL_NAME"), "champion"
    )
    scored = predictions(
        stack.predict([f"s3://{stack.bucket}/{env('LEUKEMIA_RAW_PREFIX')}{CLASSES[0]}/"])
    )
    assert len(scored) == PER_CLASS
    assert {row["class"] for row in scored} <= set(CLASSES)
    assert {str(row["model_version"]) for row in scored} == {str(champion.version)}
    assert stack.fence_hits() == []  # the client too read nothing from the workers' disks
