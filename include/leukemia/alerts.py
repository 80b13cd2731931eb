"""Alerts where a person must act: a failed task, a candidate or referred images waiting in
Required Actions, a drifted scoring batch, a training run past its deadline.

Two Airflow notifiers send them: `EmailNotifier` (the SMTP provider's hook, connection
`LEUKEMIA_ALERT_SMTP_CONN_ID`) and `WebhookNotifier` (a JSON POST to `LEUKEMIA_ALERT_WEBHOOK_URL`).
The DAGs attach them where Airflow calls notifiers (`failure_notifiers` as `on_failure_callback`,
`notifiers(Event.APPROVAL)` on the HITL operators, `training_deadline` as Deadline Alerts); task
code calls `announce`. Who hears is the deployment's configuration (`config.ENV_DEFAULTS`), never a
run's conf or Params. With no recipient and no webhook, no notifier is attached and nothing is sent.

A channel that is down never fails a task: each alert is tried `LEUKEMIA_ALERT_ATTEMPTS` times with
a doubling backoff, then one error line says what to check.
"""

from __future__ import annotations

import asyncio
import enum
import html
import json
import logging
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from airflow.providers.smtp.hooks.smtp import SmtpHook
from airflow.sdk import BaseNotifier

from leukemia.config import env

if TYPE_CHECKING:
    from airflow.sdk import DeadlineAlert

log = logging.getLogger(__name__)


class Event(enum.StrEnum):
    """What an alert is about (the `[leukemia <event>]` tag of its subject, `event` in its JSON)."""

    FAILURE = "failure"  # a task of a DAG failed after its retries
    APPROVAL = "approval"  # a gated candidate waits for a person's decision
    REVIEW = "review"  # a form of referred images waits for a reviewer
    DRIFT = "drift"  # a scoring batch differs from the champion's training images
    DEADLINE = "deadline"  # a training run has not finished in time


@dataclass(frozen=True)
class AlertSettings:
    """The deployment's alert settings (environment, `config.ENV_DEFAULTS`)."""

    recipients: tuple[str, ...]  # LEUKEMIA_ALERT_EMAILS
    smtp_conn_id: str  # LEUKEMIA_ALERT_SMTP_CONN_ID
    sender: str  # LEUKEMIA_ALERT_FROM ("": the connection's from_email)
    webhook_url: str  # LEUKEMIA_ALERT_WEBHOOK_URL
    attempts: int  # LEUKEMIA_ALERT_ATTEMPTS
    backoff_seconds: float  # LEUKEMIA_ALERT_BACKOFF_SECONDS
    timeout_seconds: float  # LEUKEMIA_ALERT_TIMEOUT_SECONDS

    @classmethod
    def from_env(cls) -> AlertSettings:
        emails = env("LEUKEMIA_ALERT_EMAILS").replace(";", ",").split(",")
        settings = cls(
            recipients=tuple(e.strip() for e in emails if e.strip()),
            smtp_conn_id=env("LEUKEMIA_ALERT_SMTP_CONN_ID"),
            sender=env("LEUKEMIA_ALERT_FROM"),
            webhook_url=env("LEUKEMIA_ALERT_WEBHOOK_URL").strip(),
            attempts=int(env("LEUKEMIA_ALERT_ATTEMPTS")),
            backoff_seconds=float(env("LEUKEMIA_ALERT_BACKOFF_SECONDS")),
            timeout_seconds=float(env("LEUKEMIA_ALERT_TIMEOUT_SECONDS")),
        )
        if settings.attempts < 1 or settings.backoff_seconds < 0 or settings.timeout_seconds <= 0:
            raise ValueError(
                "alert settings out of range: set LEUKEMIA_ALERT_ATTEMPTS to 1 or more, "
                "LEUKEMIA_ALERT_BACKOFF_SECONDS to 0 or more and LEUKEMIA_ALERT_TIMEOUT_SECONDS "
                "above 0"
            )
        if settings.webhook_url and urlsplit(settings.webhook_url).scheme not in ("http", "https"):
            raise ValueError("LEUKEMIA_ALERT_WEBHOOK_URL must be an http:// or https:// URL")
        return settings


@dataclass(frozen=True)
class Alert:
    """One alert: what happened (subject, plain-text body) and where (DAG, run, task, a link)."""

    event: str
    subject: str
    body: str
    dag_id: str = ""
    run_id: str = ""
    task_id: str = ""
    url: str = ""

    def email_subject(self) -> str:
        return f"[leukemia {self.event}] {self.subject}"

    def html(self) -> str:
        """The body as HTML: the text as written (tables stay aligned), then the link. ASCII
        only (other characters as references), so the message travels as readable 7-bit text."""
        link = f'<p><a href="{html.escape(self.url)}">{html.escape(self.url, quote=False)}</a></p>'
        text = (
            f'<pre style="white-space: pre-wrap; font-family: inherit">'
            f"{html.escape(self.body, quote=False)}</pre>{link if self.url else ''}\n"
        )
        return text.encode("ascii", "xmlcharrefreplace").decode("ascii")

    def payload(self) -> dict[str, str]:
        """The webhook's JSON: every field, plus `text` (subject and body, what chat webhooks
        such as Slack's or Mattermost's show) and `sent_at`."""
        text = f"{self.email_subject()}\n{self.body}" + (f"\n{self.url}" if self.url else "")
        return {**asdict(self), "text": text, "sent_at": datetime.now(UTC).isoformat()}


class AlertNotifier(BaseNotifier):
    """An Airflow notifier of one `event`: describes it from the Airflow context and sends it
    through `channel`, retried; a failure to send is logged, never raised into Airflow.

    Subclasses say what `configured` means and how to `send`. Built with keyword `event` only, so
    that a Deadline Alert's `SyncCallback(cls, kwargs={"event": ...})` can build it too.
    """

    channel = ""

    def __init__(self, event: str = Event.FAILURE, context: Any = None) -> None:
        super().__init__(context)
        self.event = Event(event)

    @staticmethod
    def configured(settings: AlertSettings) -> bool:
        raise NotImplementedError

    def send(self, alert: Alert, settings: AlertSettings) -> None:
        raise NotImplementedError

    def check(self, settings: AlertSettings) -> str:
        """What to check when sending fails (one phrase)."""
        raise NotImplementedError

    def notify(self, context: Any) -> None:
        try:
            alert = describe(self.event, context)
        except Exception:  # a notifier must not fail the task it reports on
            log.exception("Could not describe the %s alert from the Airflow context", self.event)
            return
        self.deliver(alert)

    async def async_notify(self, context: Any) -> None:
        await asyncio.to_thread(self.notify, context)

    def deliver(self, alert: Alert, settings: AlertSettings | None = None) -> bool:
        """Send `alert`, retried with backoff; True when it went out, False (logged) otherwise."""
        try:
            settings = settings or AlertSettings.from_env()
        except ValueError as exc:
            log.error("Not sending the %s alert %r: %s", alert.event, alert.subject, exc)
            return False
        if not self.configured(settings):
            log.info("%s alerts are off: not sending %r", self.channel.capitalize(), alert.subject)
            return False
        return _tried(
            lambda: self.send(alert, settings),
            settings,
            f"the {alert.event} alert {alert.subject!r} by {self.channel}",
            self.check(settings),
        )


class _OneTrySmtpHook(SmtpHook):
    """The SMTP provider's hook with one connection try and one send per call, within the alert's
    timeout: the alert's own attempts are the only retries (the connection's `retry_limit`,
    default 5, would multiply them)."""

    def __init__(self, smtp_conn_id: str, timeout: float) -> None:
        super().__init__(smtp_conn_id=smtp_conn_id)
        self.alert_timeout = timeout

    @property
    def smtp_retry_limit(self) -> int:
        return 0

    @property
    def timeout(self) -> int:
        return self.alert_timeout  # type: ignore[return-value]  # smtplib takes float seconds


class EmailNotifier(AlertNotifier):
    """Alerts by e-mail through the SMTP provider (connection `LEUKEMIA_ALERT_SMTP_CONN_ID`) to
    `LEUKEMIA_ALERT_EMAILS`."""

    channel = "e-mail"

    @staticmethod
    def configured(settings: AlertSettings) -> bool:
        return bool(settings.recipients)

    def send(self, alert: Alert, settings: AlertSettings) -> None:
        with _OneTrySmtpHook(settings.smtp_conn_id, settings.timeout_seconds) as smtp:
            smtp.send_email_smtp(
                to=list(settings.recipients),
                from_email=settings.sender or None,
                subject=alert.email_subject(),
                html_content=alert.html(),
                mime_charset="us-ascii",  # `Alert.html` is ASCII: 7-bit, not base64, on the wire
                custom_headers={"X-Leukemia-Alert": alert.event},
            )

    def check(self, settings: AlertSettings) -> str:
        return (
            f"the Airflow connection {settings.smtp_conn_id!r} (host, port, TLS, login, "
            "from_email or LEUKEMIA_ALERT_FROM) and that its SMTP server is up"
        )


class WebhookNotifier(AlertNotifier):
    """Alerts as a JSON POST (`Alert.payload`) to `LEUKEMIA_ALERT_WEBHOOK_URL`."""

    channel = "webhook"

    @staticmethod
    def configured(settings: AlertSettings) -> bool:
        return bool(settings.webhook_url)

    def send(self, alert: Alert, settings: AlertSettings) -> None:
        request = urllib.request.Request(
            settings.webhook_url,
            data=json.dumps(alert.payload()).encode(),
            headers={"Content-Type": "application/json", "User-Agent": "leukemia-alerts"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=settings.timeout_seconds) as answer:
            answer.read()  # an answer of 400 or more raises HTTPError

    def check(self, settings: AlertSettings) -> str:
        host = urlsplit(settings.webhook_url).netloc  # the host only: the path may hold a secret
        return f"that the webhook at {host} is up and takes a JSON POST"


#: Every channel, in the order an alert goes out.
CHANNELS: tuple[type[AlertNotifier], ...] = (EmailNotifier, WebhookNotifier)


def _tried(send: Callable[[], None], settings: AlertSettings, what: str, check: str) -> bool:
    """Call `send` up to `settings.attempts` times, waiting backoff, 2 x backoff, ... between."""
    for attempt in range(1, settings.attempts + 1):
        try:
            send()
            return True
        except Exception as exc:
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if attempt < settings.attempts:
                delay = settings.backoff_seconds * 2 ** (attempt - 1)
                log.debug("Try %d of %s failed (%s); again in %g s", attempt, what, error, delay)
                time.sleep(delay)
    log.error(
        "Could not send %s after %d tries (%s): check %s",
        what,
        settings.attempts,
        error,
        check,
    )
    return False


def notifiers(event: str, settings: AlertSettings | None = None) -> list[AlertNotifier]:
    """The configured notifiers of `event` (none when alerts are off), for an operator's
    `notifiers=` or `on_failure_callback`. Reads the settings; sends and logs nothing."""
    settings = settings or AlertSettings.from_env()
    return [channel(event) for channel in CHANNELS if channel.configured(settings)]


def failure_notifiers() -> list[AlertNotifier]:
    """The notifiers of a failed task: a DAG's `default_args["on_failure_callback"]`."""
    return notifiers(Event.FAILURE)


def training_deadline() -> list[DeadlineAlert] | None:
    """Deadline Alerts: a run not finished `LEUKEMIA_TRAINING_DEADLINE_HOURS` after it was queued
    alerts through each configured notifier (run by the executor, as a task's callback is); None
    when alerts are off or the setting is 0."""
    from airflow.sdk import DeadlineAlert, DeadlineReference, SyncCallback

    hours = float(env("LEUKEMIA_TRAINING_DEADLINE_HOURS"))
    if hours <= 0:
        return None
    deadlines = [
        DeadlineAlert(
            reference=DeadlineReference.DAGRUN_QUEUED_AT,
            interval=timedelta(hours=hours),
            callback=SyncCallback(type(n), kwargs={"event": Event.DEADLINE.value}),
            name=f"not finished {hours:g} h after queued ({n.channel})",
        )
        for n in notifiers(Event.DEADLINE)
    ]
    return deadlines or None


def announce(event: str, subject: str, body: str, context: Any | None = None) -> bool:
    """Send an alert from task code (e.g. a drifted scoring batch) through every configured
    channel; `context` (the task's Airflow context) adds the DAG, run, task and log link.

    Never raises: True when every configured channel took it; False when alerts are off (one info
    line) or a channel failed (one error line each).
    """
    try:
        settings = AlertSettings.from_env()
        alert = Alert(Event(event), subject, body, **_where(context))
        channels = notifiers(event, settings)
    except Exception as exc:  # a bad setting or event name must not fail the task
        log.error("Not sending the %s alert %r: %s", event, subject, exc)
        return False
    if not channels:
        log.info(
            "Alerts are off (LEUKEMIA_ALERT_EMAILS and LEUKEMIA_ALERT_WEBHOOK_URL are empty): "
            "not sending %r",
            subject,
        )
        return False
    return all([notifier.deliver(alert, settings) for notifier in channels])


def describe(event: str, context: Mapping[str, Any]) -> Alert:
    """The alert a notifier of `event` sends for this Airflow context."""
    where = _where(context)
    if event == Event.FAILURE:
        return _failure(context, where)
    if event in (Event.APPROVAL, Event.REVIEW):
        return _waiting(Event(event), context, where)
    if event == Event.DEADLINE:
        return _deadline(context, where)
    raise ValueError(f"no notifier describes {event!r} alerts: send them with announce()")


def _where(context: Mapping[str, Any] | None) -> dict[str, str]:
    """DAG, run, task (with its map index) and a link, from a task's context or a Deadline
    Alert's (whose `dag_run` is a dict)."""
    if not context:
        return {}
    ti = context.get("ti") or context.get("task_instance")
    if ti is not None:
        mapped = f"[{ti.map_index}]" if ti.map_index is not None and ti.map_index >= 0 else ""
        return {
            "dag_id": str(ti.dag_id),
            "run_id": str(ti.run_id),
            "task_id": f"{ti.task_id}{mapped}",
            "url": str(ti.log_url),
        }
    run = context.get("dag_run")
    if isinstance(run, Mapping):
        dag_id, run_id = str(run.get("dag_id", "")), str(run.get("dag_run_id", ""))
        return {"dag_id": dag_id, "run_id": run_id, "url": _ui_url(dag_id, run_id)}
    return {}


def _ui_url(dag_id: str, run_id: str) -> str:
    from airflow.sdk.configuration import conf

    base = conf.get("api", "base_url", fallback="http://localhost:8080/").rstrip("/")
    return f"{base}/dags/{dag_id}/runs/{quote(run_id)}"


def _failure(context: Mapping[str, Any], where: dict[str, str]) -> Alert:
    ti = context["ti"]
    error = context.get("exception")
    reason = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error
    lines = [
        f"Task {where['task_id']} of {where['dag_id']} failed on try {ti.try_number} (no retry "
        "left), so the run will not finish as planned.",
        f"Run: {where['run_id']}",
        f"Error: {str(reason or 'see the log').strip().splitlines()[0]}",
        "The task's log (the link below) has the whole error; clear the task in Airflow to run "
        "it again once the cause is fixed.",
    ]
    subject = f"{where['dag_id']}: task {where['task_id']} failed"
    return Alert(Event.FAILURE, subject, "\n".join(lines), **where)


def _waiting(event: Event, context: Mapping[str, Any], where: dict[str, str]) -> Alert:
    """A HITL operator's question, with the link to its form in Required Actions."""
    task = context["task"]
    form = where["url"].split("?")[0] + "/required_actions"
    users = [str(u.get("name") or u.get("id")) for u in task.assigned_users or []]
    closes = task.hitl_summary_extra.get("timeout_datetime")
    lines = [
        f"{task.subject}",
        "",
        "Answer in Airflow's Required Actions, at the link below.",
        f"Who may answer: {', '.join(users) or 'anyone who may act on ' + where['dag_id']}",
        f"Closes: {_minutes(closes)} (then the default answer applies)" if closes else "",
        "",
    ]
    if event is Event.APPROVAL:
        lines.append(str(task.body or ""))
    else:  # the form's body holds pre-signed links to the images: they stay in Airflow
        lines.append(
            "The form shows each image with the model's probabilities, its prediction set and "
            "links to the image and its Grad-CAM overlay (not in this message: links to patient "
            "images stay in Airflow)."
        )
    headline = "Approval needed" if event is Event.APPROVAL else "Review needed"
    return Alert(event, f"{headline}: {task.subject}", "\n".join(lines), **{**where, "url": form})


def _minutes(iso: str) -> str:
    """An ISO time in UTC as `2026-12-06 13:54 UTC`."""
    return f"{datetime.fromisoformat(iso).astimezone(UTC):%Y-%m-%d %H:%M} UTC"


def _deadline(context: Mapping[str, Any], where: dict[str, str]) -> Alert:
    """A Deadline Alert's context: the run as a dict and the deadline."""
    run = context.get("dag_run") or {}
    deadline = (context.get("deadline") or {}).get("deadline_time", "its deadline")
    lines = [
        f"Run {where['run_id']} of {where['dag_id']} was queued at {run.get('queued_at')} and "
        f"had not finished by {deadline} (LEUKEMIA_TRAINING_DEADLINE_HOURS after queueing); its "
        f"state: {run.get('state')}.",
        "It may wait for a person in Required Actions (the approval), or a task may be stuck or "
        "slow: open the run to see which.",
    ]
    subject = f"{where['dag_id']}: run {where['run_id']} past its deadline"
    return Alert(Event.DEADLINE, subject, "\n".join(lines), **where)
