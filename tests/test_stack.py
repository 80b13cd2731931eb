"""The training DAG on the production stack: CeleryExecutor, two workers that share no disk.

`leukemia.dev.stack` starts PostgreSQL, Redis, moto's S3 server, an MLflow server and Airflow
(scheduler, dag-processor, api-server, two Celery workers, each in its own empty folder behind a
fence) on 127.0.0.1; the run is triggered through the REST API as the UI does it, on synthetic
smears. `make stack-test` runs this module alone (`pytest -m stack`).

The run must keep to share-nothing (no task reaches another worker's folder, no XCom names a
local file) and succeed; the tests below it check the harness's own pieces without starting
anything.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from leukemia.config import CLASSES, env
from leukemia.dev.diagnosis import task_log_errors
from leukemia.dev.stack import (
    RunResult,
    ShareNothingViolation,
    Stack,
    StackError,
    TaskRecord,
    open_session,
    predictions,
    redis_server,
    tiny_conf,
)

ROOT = Path(__file__).resolve().parents[1]
PER_CLASS = 12
RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole stack, seeded with 12 synthetic 48 px smears per class; stopped whatever happens."""
    with open_session(tmp_path_factory.mktemp("stack"), per_class=PER_CLASS, size=48) as session:
        assert session.images == PER_CLASS * len(CLASSES)
        yield session.stack


@pytest.mark.stack
@pytest.mark.slow
def test_training_dag_runs_on_two_celery_workers_that_share_no_disk(stack: Stack) -> None:
    params = stack.dag_params()
    result = stack.run(tiny_conf(params), timeout_s=RUN_TIMEOUT_S, stop_at_first_breach=True)

    # share nothing: no task reached another worker's folder, no XCom names a local file
    breaches = result.share_nothing_report()
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


# --- the harness's own pieces, without servers ---------------------------------------------------


def _record(task_id: str, map_index: int, host: str, start_s: float, end_s: float) -> TaskRecord:
    def at(seconds: float) -> datetime:
        return datetime.fromtimestamp(1_800_000_000 + seconds, UTC)

    return TaskRecord(task_id, map_index, "success", host, at(start_s), at(end_s), 1)


def test_run_result_reports_hosts_spans_over_several_tasks_and_breaches() -> None:
    result = RunResult(
        "run-1",
        "success",
        [
            _record("extract_features", 0, "worker-a", 10, 40),
            _record("extract_features", 1, "worker-b", 12, 45),
            _record("train", 0, "worker-a", 50, 60),
            _record("train_round2", 0, "worker-b", 62, 75),
        ],
        70.0,
        fence_hits=[{"host": "worker-a", "task_id": "train", "event": "open", "path": "/s/b/x"}],
        xcom_paths=["build_split: path = /s/workers/worker-b/data/splits/s.csv"],
    )
    assert result.hosts("extract_features") == {"worker-a", "worker-b"}
    assert result.span_s("extract_features") == 35.0
    assert result.span_s("report") is None
    assert result.span_s("train", "train_round2") == 25.0  # all rounds of a halving grid
    assert len(result.of("train", "train_round2")) == 2
    assert result.hosts("train", "train_round2") == {"worker-a", "worker-b"}
    assert result.share_nothing_report() == [
        "worker-a: task train (open) reached /s/b/x",
        "XCom carries a local path: build_split: path = /s/workers/worker-b/data/splits/s.csv",
    ]


def test_task_log_errors_gives_the_exception_and_the_library_line_of_a_task_log() -> None:
    failure = {
        "level": "error",
        "event": "Task failed with exception",
        "error_detail": [
            {
                "exc_type": "FileNotFoundError",
                "exc_value": "[Errno 2] not on this host (worker-a)",
                "frames": [
                    {"filename": "/x/airflow/sdk/task_runner.py", "lineno": 1},
                    {"filename": "/p/include/leukemia/dataset.py", "lineno": 64},
                    {"filename": "/p/include/leukemia/dev/hostfence.py", "lineno": 95},
                ],
            }
        ],
    }
    text = "\n".join(
        [json.dumps({"level": "info", "event": "start"}), "not json", json.dumps(failure)]
    )
    assert task_log_errors(text) == [
        "Task failed with exception: FileNotFoundError: [Errno 2] not on this host (worker-a) "
        "at /p/include/leukemia/dataset.py:64"
    ]


def test_tiny_conf_shards_extraction_only_where_the_dag_has_the_param() -> None:
    assert "extract_shards" not in tiny_conf({"optimizers", "epochs"})
    conf = tiny_conf({"optimizers", "extract_shards"}, shards=2)
    assert conf["extract_shards"] == 2 and conf["weights"] == "none"
    assert len(conf["optimizers"]) * len(conf["batch_sizes"]) * len(conf["variants"]) == 4
    grid = tiny_conf({"optimizers", "heads", "cv_folds"})
    assert grid["heads"] == ["mlp"] and grid["cv_folds"] == 2  # still 4 trainings, still CV
    # the gate's thresholds and approval are policy: never in the run's conf, even for a tiny run
    from leukemia.policy import POLICY_PARAMS

    assert not set(POLICY_PARAMS) & set(tiny_conf({"optimizers", *POLICY_PARAMS}))


def test_the_stacks_tiny_run_gets_its_loose_policy_from_the_airflow_environment(
    tmp_path: Path,
) -> None:
    from leukemia.dev.stack import Stack

    stack = Stack(tmp_path)
    stack.ports.update(api=1, mlflow=2, s3=3, postgres=4, redis=5)  # not started: ports only named
    environ = stack.airflow_env()
    assert environ["LEUKEMIA_REQUIRE_APPROVAL"] == "false"
    assert environ["LEUKEMIA_MIN_MALIGNANT_SENSITIVITY"] == "0"


def _compose_airflow_common() -> dict[str, str]:
    """docker-compose.yaml's x-airflow-common environment, read here without the stack's help."""
    import yaml

    doc = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    return {k: str(v) for k, v in doc["x-airflow-common"]["environment"].items()}


def test_the_stack_and_docker_compose_agree_on_every_airflow_setting_they_share(
    tmp_path: Path,
) -> None:
    import re

    from leukemia.dev.airflow_settings import SHARED
    from leukemia.dev.demo import DEMO_POLICY

    stack = Stack(tmp_path)
    stack.ports.update(api=1, mlflow=2, s3=3, postgres=4, redis=5)  # not started: ports only named
    local, compose = stack.airflow_env(), _compose_airflow_common()
    assert {"AIRFLOW__CORE__EXECUTOR", "AIRFLOW__CORE__AUTH_MANAGER"} <= set(SHARED)
    for name in SHARED:  # ${VAR:-default} means the default, as compose reads it without .env
        expected = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", compose[name])
        assert local[name] == expected, name
    # a plain value in compose (no ${...}, no path, no URL) that the stack sets too means the same
    # thing locally; only the demo's loose promotion policy may differ
    plain = {
        k: v
        for k, v in compose.items()
        if "${" not in v and "/" not in v and k in local and k not in DEMO_POLICY
    }
    assert set(plain) >= {"AIRFLOW__CORE__EXECUTOR", "AIRFLOW__CORE__LOAD_EXAMPLES"}
    assert {k: local[k] for k in plain} == plain
    assert local["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"


def test_a_shared_setting_missing_from_docker_compose_stops_the_stack(tmp_path: Path) -> None:
    from leukemia.dev.airflow_settings import shared_settings

    compose = tmp_path / "docker-compose.yaml"
    compose.write_text(
        "x-airflow-common:\n  environment:\n    AIRFLOW__CORE__EXECUTOR: LocalExecutor\n"
    )
    with pytest.raises(StackError, match="no longer sets AIRFLOW__CORE__AUTH_MANAGER"):
        shared_settings(compose)
    compose.write_text(
        (ROOT / "docker-compose.yaml")
        .read_text()
        .replace("${AIRFLOW_ADMIN_USERNAME:-admin}", "${AIRFLOW_ADMIN_USERNAME}")
    )
    with pytest.raises(StackError, match="SIMPLE_AUTH_MANAGER_USERS .*needs"):
        shared_settings(compose)


def test_a_missing_redis_server_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(StackError, match="apt-get install redis-server"):
        redis_server()


def test_predictions_fail_with_the_clients_error_output() -> None:
    import subprocess

    failed = subprocess.CompletedProcess(["predict"], 2, "", "no champion: train first")
    with pytest.raises(StackError, match="no champion: train first"):
        predictions(failed)
