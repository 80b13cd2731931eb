"""The registered model: fail-closed champion lookup, idempotent promotion, verified loading.

The promotion tests run on a local SQLite store; the transient-error test runs against a real
`mlflow server` process behind a proxy that answers 503 where told to.
"""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from leukemia.model import ModelConfig
from leukemia.tracking import train_folder
from leukemia.training import TrainConfig

SIZE = 48
MODEL = "leukemia-classifier"
pytestmark = pytest.mark.slow


def _train(smear_dir: Path, workdir: Path, airflow_run_id: str, optimizer: str = "adam") -> dict:
    cfg = TrainConfig(optimizer=optimizer, batch_size=8, epochs=2, model=ModelConfig(SIZE, "none"))
    tags = {"airflow_run_id": airflow_run_id, "airflow_map_index": "0"}
    return train_folder(smear_dir, cfg, workdir, (0.5, 0.25, 0.25), "float32", tags=tags)


def _train_more(trained: dict, smear_dir: Path, optimizer: str, airflow_run_id: str) -> None:
    """One more configuration on the same split and features, as another DAG run."""
    from leukemia import tracking

    info = trained["info"]
    tracking.train_run(
        TrainConfig(optimizer=optimizer, batch_size=8, epochs=2, model=trained["cfg"].model),
        info.path,
        smear_dir,
        trained["cache"],
        tags={"airflow_run_id": airflow_run_id},
        dataset_digest=info.digest,
    )


@pytest.fixture()
def trained(smear_dir: Path, mlflow_env: Path) -> dict:
    done = _train(smear_dir, mlflow_env, "manual__1")
    return {
        "result": done["result"],
        "info": done["split"],
        "cache": done["features"].cache_dir,
        "cfg": TrainConfig(
            optimizer="adam", batch_size=8, epochs=2, model=ModelConfig(SIZE, "none")
        ),
    }


def test_selection_and_promotion(trained: dict, smear_dir: Path) -> None:
    import mlflow

    from leukemia import registry, tracking

    experiment_id = tracking.setup()
    info = trained["info"]
    first = registry.select_and_promote(experiment_id, info.path, smear_dir, "manual__1")
    assert first.alias == "champion" and first.reason == "no champion yet"
    # a second, worse-by-margin candidate becomes the challenger and the champion stays
    _train_more(trained, smear_dir, "sgd", "manual__2")
    second = registry.select_and_promote(
        experiment_id, info.path, smear_dir, "manual__2", margin=1.0
    )
    assert second.alias == "challenger" and "champion stays" in second.reason
    assert second.champion_before["version"] == first.version
    client = mlflow.MlflowClient()
    assert (
        str(client.get_model_version_by_alias("leukemia-classifier", "champion").version)
        == first.version
    )
    version = client.get_model_version("leukemia-classifier", second.version)
    assert version.status == "READY" and version.tags["airflow_run_id"] == "manual__2"
    assert registry.champion_digest("leukemia-classifier") == info.digest

    # the champion's files disappear (a wiped artifact store): it cannot serve, so it is replaced

    shutil.rmtree(
        mlflow.artifacts.download_artifacts(f"models:/leukemia-classifier/{first.version}")
    )
    _train_more(trained, smear_dir, "rmsprop", "manual__3")
    third = registry.select_and_promote(experiment_id, info.path, smear_dir, "manual__3")
    assert third.alias == "champion" and "cannot be loaded" in third.reason
    assert third.champion_before == {
        "version": first.version,
        "error": third.champion_before["error"],
    }
    assert "No such artifact" in third.champion_before["error"]
    assert (
        str(client.get_model_version_by_alias("leukemia-classifier", "champion").version)
        == third.version
    )
    assert client.get_model_version("leukemia-classifier", first.version).status == "READY"


def test_a_champion_that_fails_to_load_for_another_reason_is_not_replaced(
    trained: dict, smear_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transient failure (store unreachable) raises, so Airflow retries; no alias moves."""
    import mlflow

    from leukemia import registry, tracking

    experiment_id = tracking.setup()
    info = trained["info"]
    first = registry.select_and_promote(experiment_id, info.path, smear_dir, "manual__1")

    def unreachable(*args: object, **kwargs: object) -> None:
        raise ConnectionError("artifact store unreachable")

    _train_more(trained, smear_dir, "sgd", "manual__2")
    monkeypatch.setattr(registry, "load_keras", unreachable)
    with pytest.raises(ConnectionError):
        registry.select_and_promote(experiment_id, info.path, smear_dir, "manual__2")
    assert len(registry.client().search_model_versions("name = 'leukemia-classifier'")) == 1
    client = mlflow.MlflowClient()
    assert (
        str(client.get_model_version_by_alias("leukemia-classifier", "champion").version)
        == first.version
    )


def test_no_registered_model_and_no_alias_both_mean_no_champion(mlflow_env: Path) -> None:
    from leukemia import registry, tracking

    tracking.setup()
    assert registry.current_champion(MODEL) is None  # no registered model at all
    registry.client().create_registered_model(MODEL)
    assert registry.current_champion(MODEL) is None  # the model exists, the alias does not
    assert registry.champion_digest(MODEL) is None


@pytest.mark.parametrize(
    "code", ["TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "PERMISSION_DENIED", "INVALID_STATE"]
)
def test_any_registry_error_but_not_found_is_raised_not_read_as_no_champion(
    mlflow_env: Path, monkeypatch: pytest.MonkeyPatch, code: str
) -> None:
    from mlflow.exceptions import MlflowException

    from leukemia import registry

    class Failing:
        def get_model_version_by_alias(self, name: str, alias: str) -> None:
            raise MlflowException("the registry answered 503", error_code=code)

    monkeypatch.setattr(registry, "client", Failing)
    with pytest.raises(registry.RegistryUnavailable, match="cannot read @champion"):
        registry.current_champion(MODEL)


def test_a_retried_promotion_reuses_its_version_and_decision(
    trained: dict, smear_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after registering but before the alias moved: the retry registers nothing new."""
    from leukemia import registry, tracking

    experiment_id, info = tracking.setup(), trained["info"]
    real_client = registry.client

    class AliasFails:
        def __init__(self) -> None:
            self.inner = real_client()

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

        def set_registered_model_alias(self, *args: object) -> None:
            raise ConnectionError("worker lost before the alias moved")

    monkeypatch.setattr(registry, "client", AliasFails)
    with pytest.raises(ConnectionError):
        registry.select_and_promote(experiment_id, info.path, smear_dir, "manual__1")
    monkeypatch.setattr(registry, "client", real_client)
    first = registry.select_and_promote(experiment_id, info.path, smear_dir, "manual__1")
    again = registry.select_and_promote(experiment_id, info.path, smear_dir, "manual__1")
    versions = registry.client().search_model_versions(f"name = '{MODEL}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert first.version == again.version == "1"
    assert first.alias == again.alias == "champion" and again.reason == "no champion yet"


def test_a_promoted_model_changed_afterwards_is_refused_everywhere(
    trained: dict, smear_dir: Path
) -> None:
    import mlflow

    from leukemia import predict, registry, tracking

    experiment_id, info = tracking.setup(), trained["info"]
    first = registry.select_and_promote(experiment_id, info.path, smear_dir, "manual__1")
    version = registry.client().get_model_version(MODEL, first.version)
    assert len(version.tags["model_sha256"]) == 64
    assert predict.load_model().version == first.version  # verified and loaded
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/{first.version}"))
    with (folder / "data" / "model.keras").open("ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(registry.ModelVerificationError) as err:
        predict.load_model()
    assert "\n" not in str(err.value) and "differs from" in str(err.value)
    # promotion cannot evaluate a champion it cannot trust: the candidate replaces it
    _train_more(trained, smear_dir, "sgd", "manual__2")
    second = registry.select_and_promote(experiment_id, info.path, smear_dir, "manual__2", margin=1)
    assert second.alias == "champion" and "differs from" in second.reason


def test_a_version_not_promoted_by_the_pipeline_or_exported_is_never_loaded(
    trained: dict, smear_dir: Path
) -> None:
    """What someone with registry access could upload: no recorded hash, or a SavedModel MLmodel."""
    import mlflow

    from leukemia import predict, registry
    from leukemia.tracking import log_full_model

    uri = log_full_model(trained["result"].run_id, smear_dir, trained["info"].path)
    version = mlflow.register_model(uri, MODEL)
    registry.client().set_registered_model_alias(MODEL, "champion", version.version)
    with pytest.raises(registry.ModelVerificationError, match="no recorded model_sha256"):
        predict.load_model()
    folder = Path(mlflow.artifacts.download_artifacts(uri))
    mlmodel = folder / "MLmodel"
    mlmodel.write_text(
        mlmodel.read_text().replace("save_exported_model: false", "save_exported_model: true")
    )
    with pytest.raises(registry.ModelVerificationError, match="not a plain .keras model"):
        registry.keras_file(folder, uri)


# --- a real tracking server that answers 503 where told to ----------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FlakyProxy:
    """Forwards every request to `upstream`, except paths containing `fail_on`: those get 503."""

    def __init__(self, upstream: str) -> None:
        self.upstream, self.fail_on, self.failed = upstream, "", 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                if proxy.fail_on and proxy.fail_on in self.path:
                    proxy.failed += 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                request = urllib.request.Request(
                    proxy.upstream + self.path, data=body, method=self.command
                )
                for key in ("Content-Type", "Authorization"):
                    if self.headers.get(key):
                        request.add_header(key, self.headers[key])
                try:
                    with urllib.request.urlopen(request, timeout=60) as answer:
                        status, headers, payload = answer.status, answer.headers, answer.read()
                except urllib.error.HTTPError as exc:
                    status, headers, payload = exc.code, exc.headers, exc.read()
                self.send_response(status)
                self.send_header("Content-Type", headers.get("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture()
def flaky_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FlakyProxy]:
    """A real `mlflow server` (SQLite, served artifacts) behind a FlakyProxy; MLflow pointed at it."""
    port = _free_port()
    cmd = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination",
        str(tmp_path / "served"),
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    upstream = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{upstream}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}"
                    )
                time.sleep(0.5)
        proxy = FlakyProxy(upstream)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
        monkeypatch.setenv("LEUKEMIA_DATA_DIR", str(tmp_path / "data"))
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        yield proxy
        proxy.server.shutdown()
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()


def test_a_503_while_reading_the_champion_fails_promotion_and_moves_nothing(
    flaky_server: FlakyProxy, smear_dir: Path, tmp_path: Path
) -> None:
    """The issue's probe: with the alias lookup answering 503, a worse candidate was made champion."""
    from leukemia import registry, tracking

    _train(smear_dir, tmp_path / "w1", "manual__1")
    first = registry.select_and_promote(
        tracking.setup(),
        str(next((tmp_path / "w1" / "splits").glob("*.csv"))),
        smear_dir,
        "manual__1",
    )
    assert first.alias == "champion"
    done = _train(smear_dir, tmp_path / "w2", "manual__2", optimizer="sgd")
    flaky_server.fail_on = "registered-models/alias"
    with pytest.raises(registry.RegistryUnavailable, match="cannot read @champion"):
        registry.select_and_promote(tracking.setup(), done["split"].path, smear_dir, "manual__2")
    assert flaky_server.failed >= 1
    flaky_server.fail_on = ""
    assert [
        str(v.version) for v in registry.client().search_model_versions(f"name = '{MODEL}'")
    ] == ["1"]
    assert str(registry.current_champion(MODEL).version) == first.version
