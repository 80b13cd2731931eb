"""The review of referred images: the queue in the bucket, forms of at most N images, and the
`leukemia_review` DAG answered over Airflow's REST API as a person in Required Actions would."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from airflow_events import asset_events

from leukemia import review
from leukemia.dev.hitl import parked_run

PASSWORDS = {"dr-lee": "pw-lee"}
ROOT = Path(__file__).resolve().parents[1]


def _referral(data: bytes, key: str, bucket: str, **extra: Any) -> review.Referral:
    values: dict[str, Any] = {
        "probabilities": {"Benign": 0.02, "Early": 0.08, "Pre": 0.5, "Pro": 0.4},
        "prediction_set": "Pre|Pro",
        "predicted": "Pre",
        "confidence": 0.5,
        "refer_reason": "prediction set Pre|Pro",
        "model_version": "3",
        "scored_at": "2026-01-02T03:04:05+00:00",
        **extra,
    }
    return review.Referral(hashlib.sha256(data).hexdigest(), key, bucket, **values)


def _fake(n: int, bucket: str, start: int = 0) -> list[review.Referral]:
    return [_referral(f"image {i}".encode(), f"incoming/{i}.jpg", bucket) for i in range(start, n)]


def _keys(client: Any, bucket: str, prefix: str) -> list[str]:
    answer = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in answer.get("Contents", []))


def _settings(batch: int = 10, timeout_hours: float = 24.0) -> review.ReviewSettings:
    return review.ReviewSettings(batch=batch, timeout_hours=timeout_hours, link_hours=1.0)


@pytest.fixture()
def s3(bucket: str) -> Any:
    from leukemia.storage import s3_client

    return s3_client("aws_default")


def test_enqueue_queues_each_image_once_by_sha256_and_never_a_reviewed_one(
    s3: Any, bucket: str
) -> None:
    first = _fake(3, bucket)
    assert review.enqueue(s3, bucket, first) == 3
    assert review.enqueue(s3, bucket, [*first, *_fake(5, bucket, start=3), first[0]]) == 2
    shas = [r.sha256 for r in _fake(5, bucket)]
    assert _keys(s3, bucket, "review/") == sorted(f"review/queue/{sha}.json" for sha in shas)
    stored = json.loads(
        s3.get_object(Bucket=bucket, Key=f"review/queue/{shas[0]}.json")["Body"].read()
    )
    assert review.Referral.from_dict(stored) == first[0]
    # reviewed (a done record): not queued again, even from another key with the same bytes
    reviewed = _referral(b"reviewed", "incoming/old.jpg", bucket)
    s3.put_object(Bucket=bucket, Key=f"review/done/{reviewed.sha256}.json", Body=b"{}")
    again = _referral(b"reviewed", "incoming/copy-of-old.jpg", bucket)
    assert review.enqueue(s3, bucket, [reviewed, again]) == 0
    assert sorted(review.pending(s3, bucket)) == sorted(shas)
    with pytest.raises(ValueError, match="64 lowercase hex digits"):
        review.enqueue(s3, bucket, [review.Referral.from_dict({**stored, "sha256": "abc"})])


def test_two_scorers_enqueueing_the_same_images_at_once_queue_each_once(
    s3: Any, bucket: str
) -> None:
    from leukemia.storage import s3_client

    referrals = _fake(8, bucket)
    start, counts = threading.Barrier(2), []

    def scorer() -> None:
        client = s3_client("aws_default")
        start.wait()
        counts.append(review.enqueue(client, bucket, referrals))

    threads = [threading.Thread(target=scorer) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sum(counts) == 8 and len(counts) == 2
    assert len(_keys(s3, bucket, "review/queue/")) == 8


def test_forms_take_at_most_the_batch_and_leave_the_rest_for_the_next_form(
    s3: Any, bucket: str
) -> None:
    review.enqueue(s3, bucket, _fake(5, bucket))
    now = datetime(2026, 1, 1, tzinfo=UTC)
    forms = [review.open_form(s3, bucket, f"run-{n}", _settings(batch=2), now) for n in range(4)]
    assert forms[:3] == [f"review/forms/run-{n}.json" for n in range(3)] and forms[3] == ""
    asked = [[e["sha256"] for e in review.read_form(s3, bucket, k)["images"]] for k in forms[:3]]
    assert [len(a) for a in asked] == [2, 2, 1]
    assert sorted(sum(asked, [])) == sorted(review.pending(s3, bucket))  # each in exactly one
    # a retry of a form takes back its own images; a form past its claims' expiry frees them
    assert review.open_form(s3, bucket, "run-0", _settings(batch=2), now) == forms[0]
    assert [e["sha256"] for e in review.read_form(s3, bucket, forms[0])["images"]] == asked[0]
    later = now + timedelta(hours=24) + review.CLAIM_GRACE + timedelta(seconds=1)
    key = review.open_form(s3, bucket, "run-after", _settings(batch=10), later)
    assert len(review.read_form(s3, bucket, key)["images"]) == 5


def test_an_answer_outside_the_choices_is_refused_and_an_unanswered_image_skipped() -> None:
    manifest = {
        "images": [
            {"sha256": "a" * 64, "param": "a" * 12, "key": "incoming/a.jpg"},
            {"sha256": "b" * 64, "param": "b" * 12, "key": "incoming/b.jpg"},
            {"sha256": "c" * 64, "param": "c" * 12, "key": "incoming/c.jpg"},
        ]
    }
    answers, refused = review.read_answers(
        manifest, {"a" * 12: "Pro", "b" * 12: "Blast", "zzz": "Pre"}
    )
    assert answers == {"a" * 64: "Pro", "c" * 64: review.SKIP}
    assert list(refused) == ["b" * 64] and "'Blast'" in refused["b" * 64]


def test_applying_an_answer_twice_lands_each_image_once_and_a_replaced_source_is_refused(
    s3: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LEUKEMIA_BUCKET", bucket)
    first, second = b"first image bytes", b"second image bytes"
    for key, data in (("incoming/a.png", first), ("incoming/b.png", second)):
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    a, b = _referral(first, "incoming/a.png", bucket), _referral(second, "incoming/b.png", bucket)
    review.enqueue(s3, bucket, [a, b])
    form = review.open_form(s3, bucket, "run-1", _settings())
    s3.put_object(Bucket=bucket, Key="incoming/b.png", Body=b"another image under the same key")
    answer = {
        "form": form,
        "answers": {a.sha256: "Early", b.sha256: "Pro"},
        "refused": {},
        "reviewer": "dr-lee",
        "responded_at": "2026-01-01T00:00:00+00:00",
    }
    results = [review.apply_labels(s3, bucket, answer) for _ in range(2)]
    landed = f"raw/Early/review-{a.sha256[:12]}.png"
    assert results[0] == results[1] and results[0]["raw_keys"] == [landed]
    assert (results[0]["labelled"], results[0]["vanished"], results[0]["pending"]) == (1, 1, 0)
    assert _keys(s3, bucket, "raw/") == sorted([landed, landed.replace(".png", ".json")])
    assert s3.get_object(Bucket=bucket, Key=landed)["ContentType"] == "image/png"
    refused = review.read_json(s3, bucket, f"review/done/{b.sha256}.json")
    assert refused is not None and "now holds other bytes" in refused["reason"]
    assert review.pending(s3, bucket) == [] and _keys(s3, bucket, "review/claims/") == []


# --- the DAG, answered over the REST API ---------------------------------------------------------


@pytest.fixture()
def airflow_api(airflow_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Airflow's API app (a test client) with a reviewer who logs in with a password."""
    from airflow.api_fastapi.app import create_app
    from fastapi.testclient import TestClient

    passwords = tmp_path / "passwords.json"
    passwords.write_text(json.dumps(PASSWORDS))
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "dr-lee:admin")
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(passwords))
    return TestClient(create_app())


def _headers(http: Any) -> dict[str, str]:
    answer = http.post("/auth/token", json={"username": "dr-lee", "password": "pw-lee"})
    assert answer.status_code == 201, answer.text
    return {"Authorization": f"Bearer {answer.json()['access_token']}"}


def _url(run_id: str) -> str:
    return f"/api/v2/dags/leukemia_review/dagRuns/{run_id}/taskInstances/review/-1/hitlDetails"


def _with_reviewer(dag: Any, db: Path, act: Callable[[str], Any]) -> tuple[Any, Any]:
    """Run the DAG; when its form waits for an answer, `act(run_id)` in the background."""
    done: dict[str, Any] = {}

    def reviewer() -> None:
        try:
            run_id = parked_run(db, "leukemia_review", "review", 300, poll_s=0.3)
            if run_id is None:
                raise TimeoutError("the review form never waited for an answer")
            done["result"] = act(run_id)
        except BaseException as exc:  # reported in the test's thread
            done["error"] = exc

    thread = threading.Thread(target=reviewer, daemon=True)
    thread.start()
    run = dag.test()
    thread.join(timeout=60)
    if "error" in done:
        raise done["error"]
    return run, done.get("result")


def _states(run: Any) -> dict[str, str]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter_by(dag_id=run.dag_id, run_id=run.run_id)
        return {ti.task_id: str(ti.state) for ti in tis}


@pytest.mark.slow
def test_a_reviewer_labels_refers_back_and_skips_images_and_a_timed_out_form_releases_them(
    s3: Any,
    bucket: str,
    airflow_db: Path,
    airflow_api: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from airflow.dag_processing.dagbag import DagBag

    from leukemia.dev.synthetic import generate

    monkeypatch.setenv("LEUKEMIA_BUCKET", bucket)
    monkeypatch.setenv("LEUKEMIA_REVIEW_BATCH", "5")
    paths = generate(tmp_path / "smears", n_per_class=2, size=48, seed=3)[:6]
    images = {name: path.read_bytes() for name, path in zip("ABCDEF", paths, strict=True)}
    for name, data in images.items():
        s3.put_object(Bucket=bucket, Key=f"incoming/{name}.jpg", Body=data)
    refs = {n: _referral(d, f"incoming/{n}.jpg", bucket) for n, d in images.items()}
    refs["A"] = _referral(images["A"], "incoming/A.jpg", bucket, overlay_key="predictions/A.png")
    assert review.enqueue(s3, bucket, [refs[n] for n in "ABCDE"]) == 5
    time.sleep(
        1.1
    )  # listings have one-second times: F is queued last, so it waits for a later form
    assert review.enqueue(s3, bucket, [refs["F"]]) == 1
    sha = {n: r.sha256 for n, r in refs.items()}
    param = {n: s[:12] for n, s in sha.items()}
    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["leukemia_review"]
    events = len(asset_events("leukemia_raw_images"))

    # A → Pre, B unusable, C skipped, D an unknown class, E labelled but deleted meanwhile
    def answer(run_id: str) -> int:
        detail = airflow_api.get(_url(run_id), headers=_headers(airflow_api)).json()
        assert detail["subject"] == "Label 5 referred blood-smear images"
        fields = detail["params"]
        assert set(fields) == {param[n] for n in "ABCDE"}  # F waits for the next form
        field = fields[param["A"]]
        assert field["value"] == review.SKIP and field["schema"]["enum"] == list(review.CHOICES)
        # the UI shows a field's plain description only: each image's details are in the body
        shown = detail["body"]
        assert re.search(r"^### \d\. A\.jpg$", shown, re.MULTILINE), shown
        assert "**incoming/A.jpg**" in shown and "prediction set **Pre|Pro**" in shown
        assert "| Pre | 0.500 |" in shown and "Referred because: prediction set Pre|Pro" in shown
        assert "[image](http://127.0.0.1:" in shown and "/incoming/A.jpg?" in shown
        assert "[Grad-CAM overlay](" in shown and "/predictions/A.png?" in shown
        s3.delete_object(Bucket=bucket, Key="incoming/E.jpg")
        choices = {"A": "Pre", "B": review.UNUSABLE, "C": review.SKIP, "D": "Blast", "E": "Pro"}
        body = {"chosen_options": ["OK"], "params_input": {param[n]: c for n, c in choices.items()}}
        return airflow_api.patch(_url(run_id), json=body, headers=_headers(airflow_api)).status_code

    run, status = _with_reviewer(dag, airflow_db / "airflow.db", answer)
    assert status == 200 and str(run.state) == "success"
    assert set(_states(run).values()) == {"success"}
    landed = f"raw/Pre/review-{param['A']}"
    assert _keys(s3, bucket, "raw/") == [f"{landed}.jpg", f"{landed}.json"]
    assert s3.get_object(Bucket=bucket, Key=f"{landed}.jpg")["Body"].read() == images["A"]
    provenance = json.loads(s3.get_object(Bucket=bucket, Key=f"{landed}.json")["Body"].read())
    assert (provenance["reviewer"], provenance["label"], provenance["model_version"]) == (
        "dr-lee",
        "Pre",
        "3",
    )
    assert provenance["source"] == f"s3://{bucket}/incoming/A.jpg"
    assert provenance["prediction_set"] == "Pre|Pro" and provenance["probabilities"]["Pro"] == 0.4
    assert provenance["reviewed_at"] and provenance["raw_key"] == f"{landed}.jpg"
    done = {n: review.read_json(s3, bucket, f"review/done/{sha[n]}.json") for n in "ABCDE"}
    assert done["A"] == provenance
    assert (done["B"]["outcome"], done["E"]["outcome"]) == ("unusable", "vanished")
    assert "incoming/E.jpg is gone" in done["E"]["reason"] and "raw_key" not in done["E"]
    assert done["C"] is None and done["D"] is None
    left = review.pending(s3, bucket)
    assert sorted(left[:2]) == sorted([sha["C"], sha["D"]]) and left[2:] == [sha["F"]]
    assert _keys(s3, bucket, "review/claims/") == []
    events_now = asset_events("leukemia_raw_images")
    assert len(events_now) == events + 1 and events_now[-1]["labelled"] == 1
    form = review.read_form(s3, bucket, review.form_key(run.run_id))
    assert form["status"] == "closed" and form["reviewer"] == "dr-lee"
    assert form["outcomes"][sha["D"]]["outcome"] == "pending"
    assert "'Blast'" in form["outcomes"][sha["D"]]["detail"]
    # the form is closed: Airflow itself refuses a second answer
    again = {"chosen_options": ["OK"], "params_input": {param["C"]: "Early"}}
    second = airflow_api.patch(_url(run.run_id), json=again, headers=_headers(airflow_api))
    assert second.status_code == 409 and "already been updated" in second.text

    # nobody answers the next form in time: its images are released for the form after it
    monkeypatch.setenv("LEUKEMIA_REVIEW_TIMEOUT_HOURS", "0.0005")

    def nobody(run_id: str) -> None:
        from airflow.jobs.job import Job
        from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

        assert len(review.read_form(s3, bucket, review.form_key(run_id))["images"]) == 3
        time.sleep(2.5)  # past the 1.8 s timeout
        SchedulerJobRunner(job=Job()).check_awaiting_input_timeouts()

    late, _ = _with_reviewer(dag, airflow_db / "airflow.db", nobody)
    assert str(late.state) == "success"
    form = review.read_form(s3, bucket, review.form_key(late.run_id))
    assert form["timed_out"] and form["reviewer"] == ""
    assert {o["outcome"] for o in form["outcomes"].values()} == {"pending"}
    assert (
        _keys(s3, bucket, "review/claims/") == []
        and len(asset_events("leukemia_raw_images")) == events + 1
    )
    key = review.open_form(s3, bucket, "next", _settings())
    assert {e["sha256"] for e in review.read_form(s3, bucket, key)["images"]} == {
        sha["C"],
        sha["D"],
        sha["F"],
    }
