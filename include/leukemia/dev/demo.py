"""The embedded demo: the whole pipeline on one machine, no Docker.

Local S3 server (moto) on loopback → sample images (synthetic, or a folder such as the public data
set) uploaded to it → `airflow dags test leukemia_training` against a SQLite Airflow home inside the
working tree → MLflow in a local SQLite store → the champion's version, configuration and metrics.
The work store (what tasks hand each other) is `<workdir>/work/` as a `file://` URI, so the feature
shards outlive the in-memory S3 server and a second demo reuses them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from leukemia.config import RUN_DEFAULTS, env, project_root
from leukemia.dev.airflow_rest import task_label
from leukemia.dev.embedded import airflow

log = logging.getLogger(__name__)

#: The demo's promotion policy, set in its environment like a deployment's (`policy.py`): synthetic
#: smears on a random VGG16 say nothing clinical, and a test split of a few images makes any
#: clinical threshold a coin toss, so the demo's first model always becomes champion (the gate
#: reports, and still keeps a worse model from replacing the champion), and nobody is asked to
#: approve, so the demo never waits. A value already in the caller's environment wins; a run's conf
#: can only tighten it.
DEMO_POLICY: dict[str, str] = {
    "LEUKEMIA_MIN_F1_MACRO": "0",
    "LEUKEMIA_MIN_MALIGNANT_SENSITIVITY": "0",
    "LEUKEMIA_MIN_BENIGN_SPECIFICITY": "0",
    "LEUKEMIA_MAX_TEST_ECE": "1",
    "LEUKEMIA_REQUIRE_APPROVAL": "false",
}

#: Where TensorFlow's C++ start-up lines go (`native_stderr_to`), in the demo's workdir.
SETUP_LOG = "setup.log"

#: Input size of the synthetic demo when the VGG16 trunk is randomly initialised (see `demo_size`).
RANDOM_TRUNK_SIZE = 64


def hermetic_env(workdir: Path) -> dict[str, str]:
    """Settings that keep every file Airflow, Keras and matplotlib write inside `workdir`.

    Keras' cache in the user's home is reused when it already exists (an ImageNet file downloaded
    earlier is found there); the demo never creates it.
    """
    from leukemia.dev.embedded import airflow_home_env

    settings = {
        **airflow_home_env(workdir / "airflow", project_root()),
        "MPLCONFIGDIR": str(workdir / ".matplotlib"),
        "MLFLOW_DISABLE_TELEMETRY": "true",  # nor ~/.config/mlflow, nor a call home
    }
    if not os.environ.get("KERAS_HOME") and not (Path.home() / ".keras").exists():
        settings["KERAS_HOME"] = str(workdir / "keras")
    return settings


def embedded_env(workdir: Path, endpoint_url: str) -> dict[str, str]:
    """Environment for Airflow and the library on the embedded stack (existing values win for
    settings a user may want to override, such as the weights)."""
    from leukemia.dev.embedded import aws_connection_json

    # the local S3 server is on loopback: a site's HTTP proxy must not be asked for it
    given = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
    no_proxy = ",".join(filter(None, [given, "127.0.0.1", "localhost"]))
    return {
        **DEMO_POLICY,
        **os.environ,
        **hermetic_env(workdir),
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "AIRFLOW_CONN_AWS_DEFAULT": aws_connection_json(endpoint_url),
        "LEUKEMIA_DATA_DIR": str(workdir),
        "LEUKEMIA_WORK_URI": os.environ.get("LEUKEMIA_WORK_URI") or (workdir / "work").as_uri(),
        "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{workdir / 'mlflow.db'}",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(project_root() / "include"), os.environ.get("PYTHONPATH")])
        ),
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }


def quiet_console() -> None:
    """Library INFO lines off the terminal (the demo prints its own progress): the root logger and
    Airflow's logging configuration of this process at WARNING (`airflow dags test` keeps INFO, in
    its log file), MLflow's logger too (it sets its own level when imported)."""
    os.environ["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "WARNING"  # the subprocesses get INFO back
    logging.getLogger().setLevel(logging.WARNING)
    import mlflow  # noqa: F401  (its import sets the level that the next line overrides)

    logging.getLogger("mlflow").setLevel(logging.WARNING)


@contextmanager
def native_stderr_to(path: Path) -> Iterator[None]:
    """The process's file descriptor 2 goes to `path` for the block: TensorFlow's C++ start-up
    lines are written before its logger is set up, so TF_CPP_MIN_LOG_LEVEL does not reach them."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with path.open("ab") as fh:
            os.dup2(fh.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def choose_weights(requested: str, synthetic: bool) -> tuple[str, str | None]:
    """The weights the run will use, and a one-line notice when they fall back to `none`.

    On synthetic smears the demo must finish offline, so ImageNet weights that cannot be had become
    `none` (the synthetic classes are learnable from a random trunk); on real images, or for a weights
    file the user named, they stop the demo before anything starts.
    """
    from leukemia.weights import IMAGENET, WeightsUnavailable, normalize, resolve_weights

    try:
        return resolve_weights(requested), None
    except WeightsUnavailable as exc:
        if not synthetic or normalize(requested) != IMAGENET:  # a file the user named must exist
            raise
        return "none", (
            f"{exc}. This demo on synthetic smears runs with weights=none (a randomly initialised "
            f"VGG16) at {RANDOM_TRUNK_SIZE} px instead; its numbers say nothing about real images."
        )


def demo_size(size: int | None, weights: str) -> int:
    """The input size: the one asked for, else 224 px (VGG16's), or 64 px for a random trunk.

    A randomly initialised trunk separates the synthetic classes well at 64 px (test accuracy
    0.91-0.95 with 30 smears per class) and poorly at 224 px (0.45-0.85), at a tenth of the cost.
    """
    if size is not None:
        return size
    return RANDOM_TRUNK_SIZE if weights == "none" else RUN_DEFAULTS.input_size


def champion_summary(environ: dict[str, str]) -> dict[str, Any] | None:
    """Version, configuration and test metrics of the current champion, or None."""
    import mlflow

    mlflow.set_tracking_uri(environ["MLFLOW_TRACKING_URI"])
    from leukemia.registry import current_champion

    version = current_champion(env("LEUKEMIA_MODEL_NAME"))
    if version is None:
        return None
    return {"version": version.version, "run_id": version.run_id, **version.tags}


def failed_tasks(airflow_home: Path, dag_id: str) -> tuple[str, list[tuple[str, str]]]:
    """The latest run of `dag_id` and its tasks that did not succeed, as (task label, state)."""
    import sqlite3

    with sqlite3.connect(f"file:{airflow_home / 'airflow.db'}?mode=ro", uri=True) as db:
        row = db.execute(
            "SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1", (dag_id,)
        ).fetchone()
        if row is None:
            return "", []
        tis = db.execute(
            "SELECT task_id, map_index, state FROM task_instance "
            "WHERE dag_id = ? AND run_id = ? AND state IN ('failed', 'upstream_failed') "
            "ORDER BY start_date IS NULL, start_date, task_id, map_index",
            (dag_id, row[0]),
        ).fetchall()
    return row[0], [(task_label(t, m), state) for t, m, state in tis]


def mapped_instances(airflow_home: Path, dag_id: str, task_id: str) -> int | None:
    """How many instances mapped `task_id` has in the latest run of `dag_id`; None while unknown.

    Read while `airflow dags test` writes the database: a locked database is "not known yet".
    """
    import sqlite3

    try:
        with closing(
            sqlite3.connect(f"file:{airflow_home / 'airflow.db'}?mode=ro", uri=True, timeout=2)
        ) as db:
            row = db.execute(
                "SELECT count(*) FROM task_instance WHERE dag_id = ? AND task_id = ? "
                "AND map_index >= 0 AND run_id = "
                "(SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1)",
                (dag_id, task_id, dag_id),
            ).fetchone()
    except sqlite3.Error:
        return None
    return int(row[0]) or None


def diagnosis(airflow_home: Path, log_file: Path, dag_id: str = "leukemia_training") -> list[str]:
    """A short account of a failed run (`diagnosis.failure_report`): the failed tasks with the last
    error line of each from `airflow dags test`'s output, those not run because of them, the log."""
    from leukemia.dev.diagnosis import dags_test_errors, from_states

    run_id, tasks = failed_tasks(airflow_home, dag_id)
    if not run_id:
        return [f"No run of {dag_id} was recorded; the output is in {log_file}."]
    found = dags_test_errors(log_file.read_text(errors="replace")) if log_file.is_file() else {}
    errors = {label: [line] for label, line in found.items()}
    return from_states(dag_id, run_id, tasks, errors, f"Full output with the task logs: {log_file}")


def run_demo(
    data: Path | None = None,
    workdir: Path | None = None,
    per_class: int = 30,
    size: int | None = None,
    conf: dict[str, Any] | None = None,
    verbose: bool = False,
) -> dict[str, Any] | None:
    """Run the whole training pipeline once on the embedded stack and return the champion summary.

    Returns None when the pipeline failed (after printing which tasks failed and why). Raises
    `WeightsUnavailable` before starting anything when real images are given and the weights
    cannot be had. Unless `verbose`, library lines stay off the terminal (`quiet_console`;
    TensorFlow's start-up lines in `<workdir>/setup.log`).
    """
    workdir = (workdir or project_root() / "data" / "demo").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.update(hermetic_env(workdir))  # before anything imports Airflow, Keras or matplotlib
    if not verbose:
        quiet_console()
    from leukemia.dev.embedded import S3Server
    from leukemia.dev.synthetic import generate
    from leukemia.storage import upload_folder

    run_conf: dict[str, Any] = dict(conf or {})
    with nullcontext() if verbose else native_stderr_to(workdir / SETUP_LOG):
        import keras  # noqa: F401  (TensorFlow starts here, its C++ lines into the file)

        weights, notice = choose_weights(
            str(run_conf.get("weights") or env("LEUKEMIA_WEIGHTS")), synthetic=data is None
        )
    run_conf["weights"] = weights
    size = demo_size(run_conf.pop("input_size", size), weights)
    run_conf["input_size"] = size
    if notice:
        print(f"Notice: {notice}", flush=True)
    if data is None:
        data = workdir / f"source-{size}px"
        if not any(data.glob("*/*.jpg")):
            generate(data, n_per_class=per_class, size=size, seed=0)
    bucket = env("LEUKEMIA_BUCKET")
    with S3Server() as s3:
        environ = embedded_env(workdir, s3.endpoint_url)
        os.environ.update(
            {
                k: environ[k]
                for k in ("AIRFLOW_CONN_AWS_DEFAULT", "LEUKEMIA_DATA_DIR", "NO_PROXY", "no_proxy")
            }
        )
        prefix = env("LEUKEMIA_RAW_PREFIX")
        uploaded = upload_folder(data, bucket, prefix)
        print(
            f"Uploaded {uploaded} images from {data} to s3://{bucket}/{prefix} "
            f"on a local S3 server ({s3.endpoint_url})",
            flush=True,
        )
        airflow(["db", "migrate"], environ, quiet=True)
        before = champion_summary(environ)
        print(
            f"Running leukemia_training on the embedded stack (conf {json.dumps(run_conf)})",
            flush=True,
        )
        try:
            run_dag_test(run_conf, environ, workdir / "last_run.log")
        except RuntimeError:
            print("\n=== The pipeline failed ===")
            print("\n".join(diagnosis(Path(environ["AIRFLOW_HOME"]), workdir / "last_run.log")))
            if notice:
                print(f"Notice: {notice}")
            return None
        summary = champion_summary(environ)
        after = review_act(environ, workdir, size) if summary is not None else []
    print_summary(summary, before, environ, notice)
    if after:
        print("\n=== After the champion ships: referral and review ===")
        print("\n".join(after))
    return summary


def review_act(environ: dict[str, str], workdir: Path, size: int) -> list[str]:
    """Score an incoming batch and review what is referred (`demo_review`); a failure there is
    reported in one line and leaves the champion's summary as it is."""
    from leukemia.dev.demo_review import score_and_review

    print("Scoring an incoming batch with the champion, then reviewing what it refers", flush=True)
    try:
        return score_and_review(environ, workdir, size)
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        return [f"The referral and review step failed: {str(exc).splitlines()[0]}"]


def run_dag_test(conf: dict[str, Any], environ: dict[str, str], log_file: Path) -> None:
    """`airflow dags test leukemia_training`: Airflow's output to `log_file`, progress to stdout."""
    from leukemia.dev.progress import DagTestProgress

    dag_id = "leukemia_training"
    home = Path(environ["AIRFLOW_HOME"])
    print(f"Airflow's own output: {log_file}", flush=True)
    with DagTestProgress(total=lambda task_id: mapped_instances(home, dag_id, task_id)) as progress:
        airflow(
            ["dags", "test", dag_id, "--conf", json.dumps(conf)],
            environ,
            log_file=log_file,
            on_line=progress.feed,
        )


def print_summary(
    summary: dict[str, Any] | None,
    before: dict[str, Any] | None,
    environ: dict[str, str],
    notice: str | None,
) -> None:
    """The champion's version, configuration and metrics, and how to look at the run."""
    uri = environ["MLFLOW_TRACKING_URI"]
    print("\n=== Champion ===")
    if summary is None:
        print(
            f"No champion was registered: see the task logs in {environ['LEUKEMIA_DATA_DIR']}/last_run.log."
        )
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
        print(f"selected: {summary.get('selection', '')}")
        print(f"gate: {summary.get('gate', 'not run')}; {summary.get('decision_reason', '')}")
        if before is not None and str(before["version"]) == str(summary["version"]):
            print(
                "This run left the champion as it was: either the images equal those it was "
                "trained on (training skipped), or the new model did not pass the gate against "
                "it (the task logs above say which). To train anyway: .venv/bin/python -m "
                "leukemia demo --conf '{\"force_retrain\": true}'"
            )
    if notice:
        print(f"Notice: {notice}")
    print("\nLook at it:")
    print(
        f"  MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000  → http://127.0.0.1:5000"
    )
    print(
        f"  Airflow UI: AIRFLOW_HOME={environ['AIRFLOW_HOME']} .venv/bin/airflow standalone  → http://127.0.0.1:8080"
    )
