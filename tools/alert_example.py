"""Two alert e-mails as their recipient's mail server receives them (docs/alert_email.txt, shown
in the README): a drifted scoring batch, announced from task code, and a candidate waiting for
approval, sent by the training DAG's HITL operator itself when it asks.

A real SMTP server (aiosmtpd) listens on a free port of 127.0.0.1 for the length of the run; the
e-mails go to it through `leukemia.alerts` and the SMTP provider's hook, exactly as in a
deployment with `LEUKEMIA_ALERT_EMAILS` set. The gate's numbers are example numbers
(`leukemia.dev.alerting.example_gate`), not a measurement. Nothing else is started or written.

    .venv/bin/python tools/alert_example.py [--out docs/alert_email.txt]

Development tooling.
"""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime
from pathlib import Path

from leukemia import alerts
from leukemia.config import project_root
from leukemia.dev.alerting import Mailbox, ask, example_gate, example_ti

DRIFT_LINE = (
    "drift watch: drift: AUC 0.912, p 0.0010 (alpha 0.01; 50 images vs 500 class-matched "
    "training features, 5-fold, 999 permutations)"
)


def send_examples(box: Mailbox) -> None:
    """The drift alert, then the approval alert, into `box`."""
    from leukemia.tasks.approval import ReviewOperator

    os.environ.update(
        {
            "AIRFLOW_CONN_ALERT_EXAMPLE_SMTP": box.connection_json(),
            "LEUKEMIA_ALERT_SMTP_CONN_ID": "alert_example_smtp",
            "LEUKEMIA_ALERT_FROM": "leukemia-pipeline@hospital.example",
            "LEUKEMIA_ALERT_EMAILS": "haematology-lab@hospital.example",
            "LEUKEMIA_REQUIRE_APPROVAL": "true",
        }
    )
    os.environ.pop("LEUKEMIA_ALERT_WEBHOOK_URL", None)
    now = datetime.now(UTC).replace(microsecond=0)
    scoring = example_ti(
        "leukemia_scoring", "score_new_images", f"asset_triggered__{now.isoformat()}"
    )
    alerts.announce(
        alerts.Event.DRIFT,
        "Scoring batch drifted: 50 images under incoming/ differ from v3's training images",
        f"{DRIFT_LINE}\n\nThe batch was scored and every image referred for review. Check the "
        "stain, the microscope and the camera of this batch before trusting its predictions.",
        {"ti": scoring},
    )
    approval = ReviewOperator(task_id="approval", notifiers=alerts.notifiers(alerts.Event.APPROVAL))
    run_id = f"scheduled__{now:%F}T03:00:00+00:00"
    training = example_ti("leukemia_training", "approval", run_id, example_gate())
    ask(approval, {"params": {}, "ti": training, "task_instance": training, "task": approval})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=project_root() / "docs" / "alert_email.txt")
    args = parser.parse_args(argv)
    with Mailbox() as box:
        send_examples(box)
    header = (
        "# Alert e-mails exactly as a local SMTP server received them (tools/alert_example.py).\n"
        "# Example numbers; the envelope (MAIL FROM / RCPT TO) is on the first line of each.\n"
    )
    messages = [
        f"# envelope: MAIL FROM:<{m.mail_from}> RCPT TO:<{'>, <'.join(m.recipients)}>\n"
        + m.raw.decode("ascii").replace("\r\n", "\n")
        for m in box.received
    ]
    args.out.write_text(header + "\n".join(messages))
    print(f"{len(messages)} e-mails received, written to {args.out}")
    return 0 if len(messages) == 2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
