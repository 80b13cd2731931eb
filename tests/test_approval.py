"""The reviewer's step on full runs of the training DAG, answered over Airflow's REST API as a person
in Required Actions would (approve, reject) or left to time out, and the rollback that follows."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from airflow_events import asset_events

MODEL = "leukemia-classifier"
PASSWORDS = {"dr-lee": "pw-lee", "dr-chen": "pw-chen"}
pytestmark = pytest.mark.slow


@pytest.fixture()
def airflow_api(airflow_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Airflow's API app (a test client) with two reviewers who log in with a password."""
    from airflow.api_fastapi.app import create_app
    from fastapi.testclient import TestClient

    passwords = tmp_path / "passwords.json"
    passwords.write_text(json.dumps(PASSWORDS))
    users = ",".join(f"{user}:admin" for user in PASSWORDS)
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", users)
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(passwords))
    return TestClient(create_app())


def _login(http: Any, user: str) -> dict[str, str]:
    answer = http.post("/auth/token", json={"username": user, "password": PASSWORDS[user]})
    assert answer.status_code == 201, answer.text
    return {"Authorization": f"Bearer {answer.json()['access_token']}"}


def _parked_run(db: Path, seconds: float = 600) -> str:
    """The run whose approval task waits for an answer."""
    from leukemia.dev.hitl import parked_run

    run_id = parked_run(db, "leukemia_training", "approval", seconds)
    if run_id is None:
        raise TimeoutError("the approval task never waited for an answer")
    return run_id


def _with_reviewer(dag: Any, conf: dict[str, Any], act: Callable[[str], Any]) -> tuple[Any, Any]:
    """Run the DAG; when its approval task waits, `act(run_id)` in the background (a reviewer)."""
    done: dict[str, Any] = {}

    def reviewer() -> None:
        try:
            done["result"] = act(_parked_run(Path(conf["_db"])))
        except BaseException as exc:  # reported in the test's thread
            done["error"] = exc

    thread = threading.Thread(target=reviewer, daemon=True)
    thread.start()
    run = dag.test(run_conf={k: v for k, v in conf.items() if k != "_db"})
    thread.join(timeout=60)
    if "error" in done:
        raise done["error"]
    return run, done.get("result")


def _answer(http: Any, run_id: str, user: str, choice: str, comment: str) -> Any:
    url = f"/api/v2/dags/leukemia_training/dagRuns/{run_id}/taskInstances/approval/-1/hitlDetails"
    body = {"chosen_options": [choice], "params_input": {"comment": comment}}
    return http.patch(url, json=body, headers=_login(http, user))


def _states(run: Any) -> dict[str, str]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter_by(dag_id=run.dag_id, run_id=run.run_id)
        return {ti.task_id: str(ti.state) for ti in tis if ti.task_id != "train"}


@pytest.fixture()
def training(
    airflow_db: Path, bucket: str, mlflow_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, Any]]:
    """The training DAG on the embedded stack with images uploaded, and a tiny run's conf."""
    from airflow.dag_processing.dagbag import DagBag

    from leukemia.dev.demo import DEMO_POLICY
    from leukemia.dev.synthetic import generate
    from leukemia.storage import upload_folder

    root = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("LEUKEMIA_BUCKET", bucket)
    # two epochs at 48 px: the thresholds are tested in test_gate; the loose policy comes from the
    # environment (a run may only ask for approval on top of it)
    for name, value in DEMO_POLICY.items():
        monkeypatch.setenv(name, value)
    generate(tmp_path / "source", n_per_class=8, size=48, seed=7)
    upload_folder(tmp_path / "source", bucket, "raw/")
    conf = {
        "bucket": bucket,
        "optimizers": ["adam"],
        "batch_sizes": [8],
        "variants": ["seed"],
        # one head, no CV, no refit, no augmented copies, no audit: the reviewer's step is tested
        # here, not selection, the refit, the copies or the audit (test_dags runs those end to end)
        "heads": ["mlp"],
        "cv_folds": 1,
        "refit": False,
        "augment_copies": 0,
        "audit_images": 0,
        "epochs": 2,
        "input_size": 48,
        "weights": "none",
        "precision": "float32",
        "_db": str(airflow_db / "airflow.db"),
    }
    dag = DagBag(dag_folder=str(root / "dags")).dags["leukemia_training"]
    yield {
        "dag": dag,
        "conf": conf,
        "champion_dag": DagBag(str(root / "dags")).dags["leukemia_champion"],
    }


def test_a_person_promotes_rejects_or_lets_time_keep_the_champion_and_can_roll_back(
    training: dict[str, Any],
    airflow_api: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from leukemia import airflow_api as notify
    from leukemia import registry
    from leukemia.cli import main

    dag, conf = training["dag"], training["conf"]
    client = registry.client()
    events = len(asset_events("leukemia_champion"))

    # 1. no approval required (the demo, dags test): the gate promotes the first champion itself
    first = dag.test(run_conf={k: v for k, v in conf.items() if k != "_db"})
    assert str(first.state) == "success"
    states = _states(first)
    assert (states["promote"], states["reject"], states["report"]) == (
        "success",
        "skipped",
        "success",
    )
    v1 = client.get_model_version(MODEL, "1")
    assert v1.aliases == ["champion"] and v1.tags["decided_by"] == "the gate"
    assert len(asset_events("leukemia_champion")) == events + 1

    # 2. approval required, one respondent: another user is refused, dr-lee promotes with a comment
    asked = {**conf, "force_retrain": True, "require_approval": True}
    asked["approval_respondents"] = ["dr-lee"]

    def promote(run_id: str) -> int:
        refused = _answer(airflow_api, run_id, "dr-chen", "Promote", "not mine to say")
        assert refused.status_code == 403 and "not a respondent" in refused.text
        detail = airflow_api.get(
            f"/api/v2/dags/leukemia_training/dagRuns/{run_id}/taskInstances/approval/-1/hitlDetails",
            headers=_login(airflow_api, "dr-lee"),
        ).json()
        assert detail["subject"] == f"Promote {MODEL} v2 to @champion?"
        assert "| metric | v2 | champion v1 |" in detail["body"]
        assert "[v1 confusion matrix](" in detail["body"] and "[model card](" in detail["body"]
        return _answer(airflow_api, run_id, "dr-lee", "Promote", "sensitivity holds").status_code

    second, status = _with_reviewer(dag, asked, promote)
    assert status == 200 and str(second.state) == "success"
    assert _states(second)["promote"] == "success" and _states(second)["report"] == "success"
    v2 = client.get_model_version(MODEL, "2")
    assert v2.aliases == ["champion"]
    assert (v2.tags["decided_by"], v2.tags["review_comment"]) == ("dr-lee", "sensitivity holds")
    assert v2.tags["decision_how"] == "person" and v2.tags["decision"] == "promoted"
    assert "- **Decision**: promoted by dr-lee" in v2.description
    assert len(asset_events("leukemia_champion")) == events + 2

    # 3. dr-lee rejects: the champion stays, v3 can never be champion, no event for scoring
    third, status = _with_reviewer(
        dag,
        {**conf, "force_retrain": True, "require_approval": True},
        lambda run_id: _answer(airflow_api, run_id, "dr-lee", "Reject", "blurry batch").status_code,
    )
    assert status == 200 and str(third.state) == "success"
    states = _states(third)
    assert (states["reject"], states["promote"], states["keep_champion"]) == (
        "success",
        "skipped",
        "skipped",
    )
    v3 = client.get_model_version(MODEL, "3")
    assert (v3.tags["decision"], v3.tags["decided_by"]) == ("rejected", "dr-lee")
    assert v3.tags["review_comment"] == "blurry batch" and v3.aliases == []
    assert str(registry.current_champion().version) == "2"
    assert len(asset_events("leukemia_champion")) == events + 2

    # 4. nobody answers within the timeout: the scheduler applies the default, keep the champion
    def nobody(run_id: str) -> None:
        from airflow.jobs.job import Job
        from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

        time.sleep(3)  # past the 1.8 s timeout
        SchedulerJobRunner(job=Job()).check_awaiting_input_timeouts()

    timeout = {**conf, "force_retrain": True, "require_approval": True}
    fourth, _ = _with_reviewer(dag, {**timeout, "approval_timeout_hours": 0.0005}, nobody)
    assert str(fourth.state) == "success" and _states(fourth)["keep_champion"] == "success"
    v4 = client.get_model_version(MODEL, "4")
    assert v4.aliases == ["challenger"] and v4.tags["decision"] == "kept as challenger"
    assert (v4.tags["decided_by"], v4.tags["decision_how"]) == ("nobody", "timeout")
    assert str(registry.current_champion().version) == "2"

    # 5. roll back from Airflow: the leukemia_champion DAG, which emits the champion asset
    back = training["champion_dag"].test(run_conf={"to_version": 1, "reason": "v2 drifts"})
    assert str(back.state) == "success"
    assert str(registry.current_champion().version) == "1"
    assert len(asset_events("leukemia_champion")) == events + 3

    # 6. and from a shell: refused for the rejected v3, done for v2, Airflow told over REST
    assert main(["champion", "rollback", "--to", "3", "--reason", "try it"]) == 2
    assert "v3 was rejected by dr-lee" in capsys.readouterr().err
    monkeypatch.setenv("LEUKEMIA_AIRFLOW_API_URL", "http://testserver")
    monkeypatch.setenv("LEUKEMIA_AIRFLOW_USERNAME", "dr-chen")
    monkeypatch.setenv("LEUKEMIA_AIRFLOW_PASSWORD", PASSWORDS["dr-chen"])
    monkeypatch.setattr(notify, "http_client", lambda url: airflow_api)
    assert main(["champion", "rollback", "--to", "2", "--reason", "v1 was fine after all"]) == 0
    assert "Airflow notified" in capsys.readouterr().out
    assert asset_events("leukemia_champion")[-1]["to_version"] == "2"
    assert asset_events("leukemia_champion")[-1]["from_rest_api"] is True

    assert main(["champion", "history"]) == 0
    lines = capsys.readouterr().out.splitlines()
    moves = [line.split("  ")[1] for line in lines[:-1]]
    assert moves == ["– → v1", "v1 → v2", "v2 → v1", "v1 → v2"]
    assert "promotion by dr-lee (leukemia_training/" in lines[1]
    assert "rollback by " in lines[2] and "v2 drifts" in lines[2]
    assert lines[-1] == "@champion now: v2"
