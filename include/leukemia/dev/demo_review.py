"""The demo's last act: the loop after the champion ships, on the same embedded stack.

An incoming batch (clear synthetic smears and ambiguous ones, each a blend of two classes) is
uploaded to `incoming/`; `airflow dags test leukemia_scoring` scores it with the champion, which
refers the uncertain ones and queues them for review; `airflow dags test leukemia_review` opens the
form, which the demo answers itself over Airflow's REST API as a reviewer would from Required
Actions; the labelled images land in `raw/<Class>/` for the next training. Development tooling.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

from leukemia.config import CLASSES, env

#: The demo's reviewer (Airflow's simple auth manager, a password in the demo's Airflow home).
REVIEWER = "demo-reviewer"
#: Ambiguous smears: every pair of classes blended half and half (the demo's reviewer answers the
#: first of the pair).
BLENDS = tuple((a, b) for i, a in enumerate(CLASSES) for b in CLASSES[i + 1 :])
BLEND_WEIGHT = 0.5
INCOMING = "incoming/"


def reviewer_env(airflow_home: Path) -> dict[str, str]:
    """The simple auth manager's settings with the demo's reviewer (its password file written)."""
    passwords = airflow_home / "demo_passwords.json"
    if not passwords.is_file():
        passwords.parent.mkdir(parents=True, exist_ok=True)
        passwords.write_text(json.dumps({REVIEWER: secrets.token_urlsafe(16)}))
    return {
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{REVIEWER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
    }


def incoming_batch(folder: Path, size: int, seed: int = 7) -> dict[str, str]:
    """Write one clear smear per class and the `BLENDS` as JPEGs; {file name: the class meant}."""
    import numpy as np
    from PIL import Image

    from leukemia.dev.synthetic import render_smear

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    meant: dict[str, str] = {}
    for label in CLASSES:
        name = f"clear-{label.lower()}.jpg"
        render_smear(label, rng, size).save(folder / name, quality=92)
        meant[name] = label
    for i, (major, minor) in enumerate(BLENDS):
        a = np.asarray(render_smear(major, rng, size), dtype="float32")
        b = np.asarray(render_smear(minor, rng, size), dtype="float32")
        mixed = (BLEND_WEIGHT * a + (1 - BLEND_WEIGHT) * b).clip(0, 255).astype("uint8")
        name = f"ambiguous-{i}-{major.lower()}-{minor.lower()}.jpg"
        Image.fromarray(mixed).save(folder / name, quality=92)
        meant[name] = major
    return meant


def answer_form(
    run_id: str, labels: dict[str, str], airflow_home: Path, client: Any, bucket: str
) -> dict[str, str]:
    """Log in as the demo's reviewer and label each image of the run's form with `labels[key]`
    (the class it was made from) over the REST API (`PATCH .../hitlDetails`); {param: answer}."""
    from airflow.api_fastapi.app import create_app
    from fastapi.testclient import TestClient

    from leukemia import review

    manifest = review.read_form(client, bucket, review.form_key(run_id))
    answers = {e["param"]: labels.get(e["key"], review.UNUSABLE) for e in manifest["images"]}
    passwords = json.loads((airflow_home / "demo_passwords.json").read_text())
    http = TestClient(create_app())
    login = {"username": REVIEWER, "password": passwords[REVIEWER]}
    token = http.post("/auth/token", json=login).json()["access_token"]
    url = f"/api/v2/dags/leukemia_review/dagRuns/{run_id}/taskInstances/review/-1/hitlDetails"
    reply = http.patch(
        url,
        json={"chosen_options": ["OK"], "params_input": answers},
        headers={"Authorization": f"Bearer {token}"},
    )
    if reply.status_code != 200:
        raise RuntimeError(f"the review answer was refused: {reply.status_code} {reply.text}")
    _answers_file(airflow_home, run_id).write_text(json.dumps(answers))
    return answers


def _answers_file(airflow_home: Path, run_id: str) -> Path:
    return airflow_home / f"demo_answers-{re.sub(r'[^A-Za-z0-9]', '_', run_id)}.json"


def local_s3(environ: dict[str, str]) -> Any:
    """A boto3 client of the embedded S3 server (`AIRFLOW_CONN_AWS_DEFAULT`), without Airflow's
    hook, whose log lines would land among the demo's own."""
    import boto3

    conn = json.loads(environ["AIRFLOW_CONN_AWS_DEFAULT"])
    return boto3.client(
        "s3",
        endpoint_url=conn["extra"]["endpoint_url"],
        region_name=conn["extra"]["region_name"],
        aws_access_key_id=conn["login"],
        aws_secret_access_key=conn["password"],
    )


def _airflow_cmd() -> str:
    return str(Path(sys.executable).with_name("airflow"))


def score_and_review(environ: dict[str, str], workdir: Path, size: int) -> list[str]:
    """Score an incoming batch, let a person (the demo) review what was referred; summary lines."""
    from leukemia import review
    from leukemia.dev.embedded import airflow
    from leukemia.dev.hitl import parked_run

    bucket = env("LEUKEMIA_BUCKET")
    home = Path(environ["AIRFLOW_HOME"])
    meant = incoming_batch(workdir / f"incoming-{size}px", size)
    client = local_s3(environ)
    for name in meant:
        body = (workdir / f"incoming-{size}px" / name).read_bytes()
        client.put_object(Bucket=bucket, Key=f"{INCOMING}{name}", Body=body)
    scoring_log = workdir / "last_scoring.log"
    airflow(
        ["dags", "test", "leukemia_scoring"],
        environ,
        log_file=scoring_log,
        on_line=lambda _line: None,
    )
    queued = len(review.pending(client, bucket))
    lines = [
        f"Scored {len(meant)} incoming images (4 clear, {len(BLENDS)} blends of two classes): "
        f"{queued} referred to a person and queued under s3://{bucket}/{review.prefix()}queue/ "
        f"(CSV and Grad-CAM overlays under s3://{bucket}/predictions/; log: {scoring_log})"
    ]
    lines += _drift_lines(client, bucket)
    if not queued:
        return lines
    review_log = workdir / "last_review.log"
    with review_log.open("w") as out:
        proc = subprocess.Popen(
            [_airflow_cmd(), "dags", "test", "leukemia_review"],
            env={**environ, **reviewer_env(home)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        run_id = parked_run(home / "airflow.db", "leukemia_review", "review", before=("open_form",))
        labels = {f"{INCOMING}{name}": label for name, label in meant.items()}
        if run_id:  # a reviewer's client in its own process: Airflow's lines go to the log
            subprocess.run(
                [sys.executable, "-m", "leukemia.dev.demo_review", run_id, json.dumps(labels)],
                env={**environ, **reviewer_env(home)},
                stdout=out,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=300,
            )
        proc.wait(timeout=300)
    answers = json.loads(run_id and _answers_file(home, run_id).read_text() or "{}")
    lines.append(
        "The form waits in Airflow's UI under Required Actions (DAG leukemia_review, task "
        f"review); the demo answered it over the REST API as {REVIEWER} ({len(answers)} "
        f"image{'s' if len(answers) != 1 else ''}; "
        f"log: {review_log}):"
    )
    landed = sorted(
        o["Key"]
        for o in client.list_objects_v2(Bucket=bucket, Prefix=env("LEUKEMIA_RAW_PREFIX")).get(
            "Contents", []
        )
        if "/review-" in o["Key"] and not o["Key"].endswith(".json")
    )
    folders: dict[str, list[str]] = {}
    for key in landed:
        folder, _, name = key.rpartition("/")
        folders.setdefault(f"{folder}/", []).append(name)
    lines += [f"  {folder}: {', '.join(names)}" for folder, names in folders.items()]
    lines.append(
        f"{len(landed)} labelled image{'s' if len(landed) != 1 else ''} landed in raw/, each "
        "with its provenance (.json beside it): the next training run learns from them (the "
        "leukemia_raw_images asset was emitted)."
    )
    return lines


def _drift_lines(client: Any, bucket: str) -> list[str]:
    """The drift watch's line of the newest scoring run (its `<stamp>-drift.json`)."""
    listing = client.list_objects_v2(Bucket=bucket, Prefix="predictions/").get("Contents", [])
    reports = sorted(o["Key"] for o in listing if o["Key"].endswith("-drift.json"))
    if not reports:
        return []
    report = json.loads(client.get_object(Bucket=bucket, Key=reports[-1])["Body"].read())
    return [f"Drift watch ({reports[-1]}): {report['line'].removeprefix('drift watch: ')}"]


def main() -> None:
    """`python -m leukemia.dev.demo_review RUN_ID LABELS_JSON`: answer the run's form (the demo)."""
    from leukemia.storage import s3_client

    run_id, labels = sys.argv[1], json.loads(sys.argv[2])
    home = Path(os.environ["AIRFLOW_HOME"])
    answer_form(run_id, labels, home, s3_client("aws_default"), env("LEUKEMIA_BUCKET"))


if __name__ == "__main__":
    main()
