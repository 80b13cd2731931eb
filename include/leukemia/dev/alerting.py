"""Local stand-ins for the alerts' world: a real SMTP server on loopback that keeps what it receives
(aiosmtpd) and the Airflow connection to it, a HITL task driven up to its question, and an example
gate result. The alert tests and `tools/alert_example.py` send real e-mails through
`leukemia.alerts` with them.
"""

from __future__ import annotations

import email
import email.policy
import html
import json
import logging
import re
from dataclasses import dataclass, field
from email.message import EmailMessage
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

from leukemia.dev.processes import free_port


@dataclass(frozen=True)
class Received:
    """One message as the server received it: the envelope and the raw bytes."""

    mail_from: str
    recipients: list[str]
    raw: bytes

    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)  # what the default policy builds
        return parsed

    def text(self) -> str:
        """Its body as a reader sees it: the HTML's text, tags dropped, references resolved."""
        part = self.message().get_body(preferencelist=("html", "plain"))
        content = part.get_content() if part is not None else ""
        return html.unescape(re.sub(r"<[^>]+>", "", content))


@dataclass
class Mailbox:
    """`with Mailbox() as box:` an SMTP server on 127.0.0.1:`box.port`; `box.received` fills as
    messages arrive. No TLS, no login (what `connection_json` tells the provider's hook)."""

    received: list[Received] = field(default_factory=list)
    port: int = 0
    _controller: Any = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.received.append(
            Received(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.original_content))
        )
        return "250 Message accepted"

    def __enter__(self) -> Mailbox:
        from aiosmtpd.controller import Controller

        logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every command
        self.port = free_port()
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()

    def connection_json(self, from_email: str = "") -> str:
        """An `AIRFLOW_CONN_<ID>` value for this server (the SMTP provider's connection)."""
        extra = {"disable_ssl": True, "disable_tls": True, "from_email": from_email or None}
        return json.dumps(
            {"conn_type": "smtp", "host": "127.0.0.1", "port": self.port, "extra": extra}
        )


def ask(operator: Any, context: dict[str, Any]) -> None:
    """Run a HITL operator's `execute` as its task would, up to where it waits for the answer:
    its notifiers fire as in a run; the request it writes to Airflow's database is left out
    (there is none here). Raises when the operator decided without asking."""
    from unittest import mock

    from airflow.sdk.exceptions import TaskAwaitingInput

    with mock.patch("airflow.providers.standard.operators.hitl.upsert_hitl_detail"):
        try:
            operator.execute(context)
        except TaskAwaitingInput:
            return
    raise RuntimeError(f"{operator.task_id} decided without asking anyone")


def example_gate() -> dict[str, Any]:
    """A gate result (`gate.GateResult` as a dict) of a candidate that passed, for examples:
    v4 against champion v3 on a test split of 351 images. Example numbers, not a measurement."""
    from leukemia.config import CLASSES

    def evaluation(version: str, f1: float, recalls: list[float], run: str) -> dict[str, Any]:
        metrics = {"accuracy_score": f1 + 0.002, "f1_score": f1}
        metrics |= {f"recall_{c}": r for c, r in zip(CLASSES, recalls, strict=True)}
        metrics |= {"malignant_sensitivity": 1.0, "benign_specificity": recalls[0]}
        return {
            "version": version,
            "run_id": run,
            "metrics": metrics,
            "intervals": {k: [max(0.0, v - 0.02), min(1.0, v + 0.01)] for k, v in metrics.items()},
            "confusion_matrix": [[53, 1, 0, 0], [0, 104, 2, 0], [0, 1, 102, 1], [0, 0, 1, 86]],
            "examples": 351,
            "url": f"http://localhost:5000/#/experiments/1/runs/{run}",
        }

    checks = [
        ("min_f1_macro", "macro-F1 0.9830 vs minimum 0.9"),
        ("min_malignant_sensitivity", "malignant sensitivity 1.0000 vs minimum 0.99"),
        ("min_benign_specificity", "benign specificity 0.9815 vs minimum 0.9"),
        ("max_test_ece", "test ECE 0.0210 vs maximum 0.05"),
        ("min_gain_over_champion", "macro-F1 0.9830 vs champion v3 0.9750 + 0"),
    ]
    return {
        "name": "leukemia-classifier",
        "version": "4",
        "run_id": "9f3c",
        "passed": True,
        "champion_note": "champion v3 re-evaluated on the same test split",
        "checks": [{"name": n, "status": "passed", "line": f"{n}: passed: {t}"} for n, t in checks],
        "candidate": evaluation("4", 0.983, [0.9815, 0.9811, 0.9808, 0.9885], "9f3c"),
        "champion": evaluation("3", 0.975, [0.963, 0.972, 0.981, 0.977], "51ab"),
        "card_url": "http://localhost:5000/#/experiments/1/runs/9f3c/artifacts/model_card.md",
    }


def example_ti(
    dag_id: str, task_id: str, run_id: str, xcom: Any = None, map_index: int = -1
) -> SimpleNamespace:
    """What a running task's context holds as `ti`, as far as the alerts and the HITL operators
    read it; `xcom_pull` answers `xcom` (the gate's result, a form's key)."""
    mapped = f"/mapped/{map_index}" if map_index >= 0 else ""
    url = f"http://localhost:8080/dags/{dag_id}/runs/{quote(run_id)}/tasks/{task_id}{mapped}"
    return SimpleNamespace(
        id="0193a0c2-0000-7000-8000-000000000001",
        dag_id=dag_id,
        run_id=run_id,
        task_id=task_id,
        map_index=map_index,
        try_number=1,
        log_url=f"{url}?try_number=1",
        xcom_pull=lambda **_: xcom,
        xcom_push=lambda *_: None,
    )
