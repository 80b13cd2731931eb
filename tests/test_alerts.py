"""Alerts: each kind reaches a real local SMTP server and a real local webhook; a channel that is
down never fails the task; off unless the deployment configures it, never from a run's conf."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import structlog

from leukemia import alerts
from leukemia.alerts import EmailNotifier, Event, WebhookNotifier
from leukemia.config import ENV_DEFAULTS
from leukemia.dev.alerting import Mailbox, ask, example_gate, example_ti
from leukemia.dev.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
RECIPIENTS = ["lab-lead@lab.example", "on-call@lab.example"]
SENDER = "airflow@lab.example"
RUN_ID = "manual__2026-12-01T03:00:00+00:00"
RUN_URL = "http://localhost:8080/dags/{}/runs/manual__2026-12-01T03%3A00%3A00%2B00%3A00"
DRIFT_LINE = (
    "drift watch: drift: AUC 0.912, p 0.0010 (alpha 0.01; 50 images vs 500 training features, "
    "5-fold, 999 permutations)"
)


@pytest.fixture(autouse=True)
def alerts_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """No alert setting of the developer's leaks in; no proxy sits between us and loopback."""
    for name in ENV_DEFAULTS:
        if name.startswith("LEUKEMIA_ALERT_") or name == "LEUKEMIA_TRAINING_DEADLINE_HOURS":
            monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LEUKEMIA_ALERT_BACKOFF_SECONDS", "0.01")


@pytest.fixture()
def mailbox(monkeypatch: pytest.MonkeyPatch) -> Iterator[Mailbox]:
    """A real SMTP server on loopback, the Airflow connection to it, alerts to two recipients."""
    with Mailbox() as box:
        monkeypatch.setenv("AIRFLOW_CONN_ALERTS_SMTP", box.connection_json(SENDER))
        monkeypatch.setenv("LEUKEMIA_ALERT_SMTP_CONN_ID", "alerts_smtp")
        monkeypatch.setenv("LEUKEMIA_ALERT_EMAILS", ", ".join(RECIPIENTS))
        yield box


class _Hook(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server: Any = self.server
        server.posts.append((self.path, self.headers["Content-Type"], body))
        self.send_response(server.status)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def webhook(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A real HTTP server on loopback that records each POST (`.posts`) and answers `.status`."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    server.posts, server.status = [], 200  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hooks/secret-token"
    monkeypatch.setenv("LEUKEMIA_ALERT_WEBHOOK_URL", url)
    yield server
    server.shutdown()
    server.server_close()


def _failure_context(dag_id: str = "leukemia_scoring", **conf: Any) -> dict[str, Any]:
    ti = example_ti(dag_id, "score_new_images", RUN_ID)
    run = SimpleNamespace(conf=conf, run_id=RUN_ID)
    error = OSError("could not reach s3://leukemia-images/incoming/\nsecond line")
    return {"ti": ti, "task_instance": ti, "dag_run": run, "params": conf, "exception": error}


def _only(box: Mailbox) -> Any:
    assert len(box.received) == 1, [m.message()["Subject"] for m in box.received]
    return box.received[0]


def test_a_failed_task_emails_each_recipient_the_dag_task_error_and_log_link(
    mailbox: Mailbox,
) -> None:
    for notifier in alerts.failure_notifiers():  # as Airflow calls on_failure_callback
        notifier(_failure_context())
    mail = _only(mailbox)
    assert (mail.mail_from, mail.recipients) == (SENDER, RECIPIENTS)
    message, body = mail.message(), mail.text()
    assert message["Subject"] == "[leukemia failure] leukemia_scoring: task score_new_images failed"
    assert message["To"] == ", ".join(RECIPIENTS)
    assert "Task score_new_images of leukemia_scoring failed on try 1" in body
    assert "Error: OSError: could not reach s3://leukemia-images/incoming/" in body
    assert "second line" not in body
    assert f"Run: {RUN_ID}" in body
    assert RUN_URL.format("leukemia_scoring") + "/tasks/score_new_images?try_number=1" in body


def test_a_candidate_waiting_for_approval_emails_the_question_metrics_and_form_link(
    mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    from leukemia.tasks.approval import ReviewOperator

    monkeypatch.setenv("LEUKEMIA_REQUIRE_APPROVAL", "true")
    monkeypatch.setenv("LEUKEMIA_APPROVAL_RESPONDENTS", "dr-lee")
    operator = ReviewOperator(task_id="approval", notifiers=alerts.notifiers(Event.APPROVAL))
    ti = example_ti("leukemia_training", "approval", RUN_ID, example_gate())
    ask(operator, {"params": {}, "ti": ti, "task_instance": ti, "task": operator})

    mail = _only(mailbox)
    assert mail.recipients == RECIPIENTS
    assert mail.message()["Subject"] == (
        "[leukemia approval] Approval needed: Promote leukemia-classifier v4 to @champion?"
    )
    body = mail.text()
    assert "Answer in Airflow's Required Actions, at the link below." in body
    form = RUN_URL.format("leukemia_training") + "/tasks/approval/required_actions"
    assert body.rstrip().endswith(form)
    assert "Who may answer: dr-lee" in body
    assert "| metric | v4 | champion v3 |" in body  # the reviewer's comparison
    assert "min_malignant_sensitivity: passed" in body


def test_referred_images_waiting_email_the_count_and_form_link_but_no_image_link(
    mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    from leukemia import review
    from leukemia.tasks import review_dag

    entry = {
        "param": "img_1",
        "key": "incoming/smear-17.jpg",
        "sha256": "ab" * 32,
        "model_version": "4",
        "predicted": "Pre",
        "confidence": 0.55,
        "prediction_set": "Early, Pre",
        "refer_reason": "prediction set of 2 classes",
        "probabilities": {"Benign": 0.01, "Early": 0.42, "Pre": 0.55, "Pro": 0.02},
        "image_url": "https://s3.example/leukemia-images/incoming/smear-17.jpg?X-Amz-Signature=1",
    }
    manifest = {"images": [entry, {**entry, "param": "img_2"}], "closes_at": "2026-12-02T03:00Z"}
    monkeypatch.setattr(review_dag, "_client", lambda conn_id: None)
    monkeypatch.setattr(review, "read_form", lambda client, bucket, key: manifest)
    operator = review_dag.ReviewFormOperator(
        task_id="review", notifiers=alerts.notifiers(Event.REVIEW)
    )
    ti = example_ti("leukemia_review", "review", RUN_ID, "review/forms/f1.json")
    context = {"params": {"bucket": "b", "conn_id": ""}, "ti": ti, "task_instance": ti}
    ask(operator, {**context, "task": operator})

    mail = _only(mailbox)
    assert mail.message()["Subject"] == (
        "[leukemia review] Review needed: Label 2 referred blood-smear images"
    )
    body = mail.text()
    assert body.rstrip().endswith(
        RUN_URL.format("leukemia_review") + "/tasks/review/required_actions"
    )
    closes = datetime.fromisoformat(operator.hitl_summary_extra["timeout_datetime"])
    assert closes - datetime.now(UTC) > timedelta(hours=23.9)  # LEUKEMIA_REVIEW_TIMEOUT_HOURS
    assert f"Closes: {closes:%Y-%m-%d %H:%M} UTC (then the default answer applies)" in body
    assert "X-Amz-Signature" not in body and "smear-17" not in body  # patient images stay put


def test_a_drifted_scoring_run_emails_its_drift_line_and_where_its_report_is(
    mailbox: Mailbox,
) -> None:
    from leukemia.tasks.scoring_dag import announce_drift

    context = {"ti": example_ti("leukemia_scoring", "score_new_images", RUN_ID)}
    result = {
        "scored": 50,
        "referred": 50,
        "queued": 48,
        "predictions_uri": "s3://b/predictions/v3/x.csv",
        "drift_uri": "s3://b/predictions/v3/x-drift.json",
        "model_uri": "models:/leukemia-classifier/3",
        "drift": {"drifted": True, "decision": "drift", "line": DRIFT_LINE},
    }
    assert announce_drift(result, context) is True
    mail = _only(mailbox)
    assert mail.recipients == RECIPIENTS
    subject = "Scoring batch drifted: 50 images unlike the training images"
    assert mail.message()["Subject"] == f"[leukemia drift] {subject}"
    assert mail.message()["X-Leukemia-Alert"] == "drift"
    for text in (DRIFT_LINE, "50 referred, 48 newly queued", "s3://b/predictions/v3/x-drift.json"):
        assert text in mail.text()
    assert RUN_URL.format("leukemia_scoring") + "/tasks/score_new_images" in mail.text()
    # a run that did not drift (or had no decision) sends nothing
    undrifted = {**result, "drift": {"drifted": False, "decision": "no drift", "line": "…"}}
    assert announce_drift(undrifted, context) is False and len(mailbox.received) == 1


def test_a_missed_training_deadline_emails_the_run_through_airflows_callback_runner(
    mailbox: Mailbox,
) -> None:
    from airflow.sdk.execution_time.callback_supervisor import execute_callback

    (deadline,) = alerts.training_deadline() or []
    context = {
        "dag_run": {
            "dag_id": "leukemia_training",
            "dag_run_id": RUN_ID,
            "queued_at": "2026-12-01T03:00:00+00:00",
            "state": "running",
        },
        "deadline": {"id": "d1", "deadline_time": "2026-12-02T03:00:00+00:00"},
    }
    kwargs = {**deadline.callback.kwargs, "context": context}  # what the scheduler queues
    log = structlog.get_logger()
    ok, error = execute_callback(deadline.callback.path, kwargs, "", None, log)
    assert (ok, error) == (True, None)
    mail = _only(mailbox)
    assert mail.message()["Subject"] == (
        f"[leukemia deadline] leukemia_training: run {RUN_ID} past its deadline"
    )
    assert "was queued at 2026-12-01T03:00:00+00:00" in mail.text()
    assert "had not finished by 2026-12-02T03:00:00+00:00" in mail.text()


def test_the_webhook_receives_each_alert_as_json_with_event_subject_text_and_link(
    webhook: Any,
) -> None:
    WebhookNotifier(Event.FAILURE)(_failure_context("leukemia_training"))
    assert alerts.announce(Event.DRIFT, "Scoring batch drifted", DRIFT_LINE) is True
    assert [(path, kind) for path, kind, _ in webhook.posts] == [
        ("/hooks/secret-token", "application/json")
    ] * 2
    failure, drift = (payload for _, _, payload in webhook.posts)
    assert failure["event"] == "failure"
    assert failure["subject"] == "leukemia_training: task score_new_images failed"
    assert (failure["dag_id"], failure["run_id"]) == ("leukemia_training", RUN_ID)
    assert failure["url"].endswith("/tasks/score_new_images?try_number=1")
    assert failure["text"].startswith("[leukemia failure] leukemia_training: task")
    assert drift["event"] == "drift" and drift["body"] == DRIFT_LINE
    assert drift["text"] == f"[leukemia drift] Scoring batch drifted\n{DRIFT_LINE}"
    assert set(drift) >= {"subject", "sent_at", "task_id"}


def test_an_smtp_server_that_hangs_up_fails_the_alert_not_the_task_after_three_logged_tries(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    tries: list[int] = []

    def hang_up() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            tries.append(1)
            connection.close()

    threading.Thread(target=hang_up, daemon=True).start()
    conn = {"conn_type": "smtp", "host": "127.0.0.1", "port": server.getsockname()[1]}
    monkeypatch.setenv("AIRFLOW_CONN_ALERTS_SMTP", json.dumps(conn))
    monkeypatch.setenv("LEUKEMIA_ALERT_SMTP_CONN_ID", "alerts_smtp")
    monkeypatch.setenv("LEUKEMIA_ALERT_EMAILS", RECIPIENTS[0])
    try:
        with caplog.at_level(logging.ERROR, logger="leukemia.alerts"):
            EmailNotifier(Event.FAILURE)(_failure_context())  # returns: nothing raised
    finally:
        server.close()
    assert len(tries) == 3  # LEUKEMIA_ALERT_ATTEMPTS' default, one connection each
    (line,) = [r.getMessage() for r in caplog.records]
    assert "Could not send the failure alert" in line and "after 3 tries" in line
    assert "check the Airflow connection 'alerts_smtp'" in line


def test_a_webhook_that_answers_503_is_tried_the_configured_times_and_logged_without_its_path(
    webhook: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    webhook.status = 503
    monkeypatch.setenv("LEUKEMIA_ALERT_ATTEMPTS", "4")
    with caplog.at_level(logging.ERROR, logger="leukemia.alerts"):
        assert alerts.announce(Event.DRIFT, "Scoring batch drifted", DRIFT_LINE) is False
    assert len(webhook.posts) == 4
    (line,) = [r.getMessage() for r in caplog.records]
    assert "after 4 tries (HTTPError: HTTP Error 503" in line
    assert f"webhook at 127.0.0.1:{webhook.server_address[1]} is up" in line
    assert "secret-token" not in line  # a webhook's path may be its secret


def test_tries_wait_half_a_second_then_one_second_by_default_so_a_dead_server_costs_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LEUKEMIA_ALERT_BACKOFF_SECONDS")
    monkeypatch.setenv("LEUKEMIA_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{free_port()}/hook")
    waits: list[float] = []
    monkeypatch.setattr(alerts.time, "sleep", waits.append)
    started = time.perf_counter()
    assert alerts.announce(Event.DRIFT, "Scoring batch drifted", DRIFT_LINE) is False
    assert waits == [0.5, 1.0]
    assert time.perf_counter() - started < 1.0  # refused at once: the waits are the cost


def test_alerts_are_off_by_default_nothing_is_sent_and_one_info_line_says_so(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Mailbox() as box:
        monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", box.connection_json(SENDER))
        with caplog.at_level(logging.INFO, logger="leukemia.alerts"):
            assert alerts.announce(Event.DRIFT, "Scoring batch drifted", DRIFT_LINE) is False
            assert alerts.failure_notifiers() == []
            assert alerts.notifiers(Event.APPROVAL) == []
            assert alerts.training_deadline() is None
    assert box.received == []
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("Alerts are off (LEUKEMIA_ALERT_EMAILS and LEUKEMIA_ALERT_WEBHOOK_URL")


def test_recipients_come_from_the_deployment_never_from_a_runs_conf_or_params(
    mailbox: Mailbox,
) -> None:
    evil = {
        "LEUKEMIA_ALERT_EMAILS": "someone@elsewhere.example",
        "alert_emails": "someone@elsewhere.example",
        "to": "someone@elsewhere.example",
    }
    for notifier in alerts.failure_notifiers():
        notifier(_failure_context(**evil))
    assert _only(mailbox).recipients == RECIPIENTS
    from leukemia.tasks.params import s3_params, training_params

    names = {*training_params(), *s3_params("bucket")}
    assert not {n for n in names if any(w in n for w in ("alert", "email", "webhook"))}


def test_a_bad_alert_setting_is_logged_and_never_fails_the_caller(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("LEUKEMIA_ALERT_WEBHOOK_URL", "file:///etc/passwd")
    with caplog.at_level(logging.ERROR, logger="leukemia.alerts"):
        assert alerts.announce(Event.DRIFT, "Scoring batch drifted", DRIFT_LINE) is False
    assert "must be an http:// or https:// URL" in caplog.text


def test_configured_alerts_ride_on_the_hitl_operators_failure_callbacks_and_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk import DeadlineReference
    from airflow.serialization.serialized_objects import DagSerialization

    monkeypatch.setenv("LEUKEMIA_ALERT_EMAILS", RECIPIENTS[0])
    monkeypatch.setenv("LEUKEMIA_ALERT_WEBHOOK_URL", "https://chat.lab.example/hooks/x")
    monkeypatch.setenv("LEUKEMIA_TRAINING_DEADLINE_HOURS", "12")
    dags = {}
    for name in ("leukemia_training", "leukemia_review"):
        bag = DagBag(dag_folder=str(ROOT / "dags" / f"{name}.py"))
        assert bag.import_errors == {}
        dags[name] = bag.dags[name]

    def kinds(notifiers: Any) -> list[tuple[type, str]]:
        return [(type(n), str(n.event)) for n in notifiers]

    both = [EmailNotifier, WebhookNotifier]
    training, review = dags["leukemia_training"], dags["leukemia_review"]
    assert kinds(training.get_task("approval").notifiers) == [(c, "approval") for c in both]
    assert kinds(review.get_task("review").notifiers) == [(c, "review") for c in both]
    for dag in (training, review):
        for task in dag.tasks:
            assert kinds(task.on_failure_callback) == [(c, "failure") for c in both], task
    assert [(d.reference, d.interval.total_seconds() / 3600) for d in training.deadline] == [
        (DeadlineReference.DAGRUN_QUEUED_AT, 12.0)
    ] * 2
    assert [(d.callback.path, d.callback.kwargs) for d in training.deadline] == [
        ("leukemia.alerts.EmailNotifier", {"event": "deadline"}),
        ("leukemia.alerts.WebhookNotifier", {"event": "deadline"}),
    ]
    serialized = DagSerialization.to_dict(training)["dag"]["deadline"]
    assert len(serialized) == 2  # what the DAG processor stores for the scheduler
