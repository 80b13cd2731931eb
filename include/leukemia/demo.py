"""The embedded demo: the whole pipeline on one machine, no Docker.

Local S3 server (moto) on loopback → sample images (synthetic, or a folder such as the public data
set) uploaded to it → `airflow dags test leukemia_training` against a SQLite Airflow home inside the
working tree → MLflow in a local SQLite store → the champion's version, configuration and metrics.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from leukemia.config import env

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]


def embedded_env(workdir: Path, endpoint_url: str) -> dict[str, str]:
    """Environment for Airflow and the library on the embedded stack (existing values win for
    settings a user may want to override, such as the weights)."""
    from leukemia.embedded import airflow_home_env, aws_connection_json

    return {
        **os.environ,
        **airflow_home_env(workdir / "airflow", ROOT),
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "AIRFLOW_CONN_AWS_DEFAULT": aws_connection_json(endpoint_url),
        "LEUKEMIA_DATA_DIR": str(workdir),
        "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{workdir / 'mlflow.db'}",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT / "include"), os.environ.get("PYTHONPATH")])
        ),
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
    }


def airflow(args: list[str], environ: dict[str, str], quiet: bool = False) -> None:
    """Run the `airflow` CLI of this interpreter's environment; raise with its output on failure."""
    cmd = [str(Path(sys.executable).with_name("airflow")), *args]
    proc = subprocess.run(cmd, env=environ, capture_output=quiet, text=True)
    if proc.returncode != 0:
        detail = (proc.stdout or "")[-4000:] + (proc.stderr or "")[-4000:] if quiet else ""
        raise RuntimeError(
            f"`airflow {' '.join(args)}` failed with exit code {proc.returncode}\n{detail}"
        )


def champion_summary(environ: dict[str, str]) -> dict[str, Any] | None:
    """Version, configuration and test metrics of the current champion, or None."""
    import mlflow

    mlflow.set_tracking_uri(environ["MLFLOW_TRACKING_URI"])
    from leukemia.tracking import current_champion

    version = current_champion(env("LEUKEMIA_MODEL_NAME"))
    if version is None:
        return None
    return {"version": version.version, "run_id": version.run_id, **version.tags}


def run_demo(
    data: Path | None = None,
    workdir: Path | None = None,
    per_class: int = 30,
    size: int = 224,
    conf: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Run the whole training pipeline once on the embedded stack and return the champion summary."""
    from leukemia.embedded import S3Server
    from leukemia.storage import upload_folder
    from leukemia.synthetic import generate

    workdir = (workdir or ROOT / "data" / "demo").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = workdir / "source"
        if not any(data.glob("*/*.jpg")):
            generate(data, n_per_class=per_class, size=size, seed=0)
    bucket = env("LEUKEMIA_BUCKET")
    with S3Server() as s3:
        environ = embedded_env(workdir, s3.endpoint_url)
        os.environ.update(
            {k: environ[k] for k in ("AIRFLOW_CONN_AWS_DEFAULT", "LEUKEMIA_DATA_DIR")}
        )
        upload_folder(data, bucket, env("LEUKEMIA_RAW_PREFIX"))
        airflow(["db", "migrate"], environ, quiet=True)
        before = champion_summary(environ)
        run_conf = {"input_size": size, **(conf or {})}
        print(
            f"Running leukemia_training on the embedded stack (conf {json.dumps(run_conf)})",
            flush=True,
        )
        airflow(["dags", "test", "leukemia_training", "--conf", json.dumps(run_conf)], environ)
    summary = champion_summary(environ)
    uri = environ["MLFLOW_TRACKING_URI"]
    print("\n=== Champion ===")
    if summary is None:
        print("No champion was registered: see the task logs above.")
    else:
        print(f"leukemia-classifier v{summary['version']} (run {summary['run_id']})")
        print(f"configuration: {summary.get('config', '')}")
        for key in (
            "test_accuracy",
            "test_f1_macro",
            "test_malignant_sensitivity",
            "test_benign_specificity",
        ):
            print(f"  {key}: {summary.get(key, '?')}")
        print(f"why promoted: {summary.get('selection', '')}")
        if before is not None and str(before["version"]) == str(summary["version"]):
            print(
                "This run left the champion as it was: either the images equal those it was "
                "trained on (training skipped), or the new model did not beat it (the task logs "
                "above say which). To train anyway: .venv/bin/python -m leukemia demo --conf "
                "'{\"force_retrain\": true}'"
            )
    print("\nLook at it:")
    print(
        f"  MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000  → http://127.0.0.1:5000"
    )
    print(
        f"  Airflow UI: AIRFLOW_HOME={environ['AIRFLOW_HOME']} .venv/bin/airflow standalone  → http://127.0.0.1:8080"
    )
    return summary
