"""The embedded stack: moto's S3 server on loopback, and the Airflow connection that points at it.

The demo, the integration tests and the benchmarks talk to it over HTTP exactly as to a real bucket
(no in-process mocking); an optional per-request delay stands in for a real S3 round trip.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Credentials moto accepts; never real ones.
LOCAL_ACCESS_KEY = "local-access-key"
LOCAL_SECRET_KEY = "local-secret-key"
LOCAL_REGION = "us-east-1"


def airflow_home_env(home: Path, project_root: Path) -> dict[str, str]:
    """Settings of a local SQLite Airflow home serving this project's DAGs and plugins
    (the demo and the tests run Airflow this way)."""
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(project_root / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(project_root / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
    }


def aws_connection_json(endpoint_url: str, region: str = LOCAL_REGION) -> str:
    """An `AIRFLOW_CONN_AWS_DEFAULT` value (JSON form) that points the S3 hook at `endpoint_url`."""
    return json.dumps(
        {
            "conn_type": "aws",
            "login": LOCAL_ACCESS_KEY,
            "password": LOCAL_SECRET_KEY,
            "extra": {"endpoint_url": endpoint_url, "region_name": region},
        }
    )


@dataclass
class RequestCounter:
    """Counts requests by HTTP method (the tests check that a no-op resync makes no GET of objects)."""

    counts: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, method: str, listing: bool) -> None:
        name = "LIST" if listing else method
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + 1

    def reset(self) -> None:
        with self.lock:
            self.counts.clear()


def _middleware(app: Callable, delay_s: float, counter: RequestCounter) -> Callable:
    """WSGI wrapper: count each request, then wait `delay_s` before answering."""

    def wrapped(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        query = environ.get("QUERY_STRING", "")
        path = environ.get("PATH_INFO", "")
        listing = environ["REQUEST_METHOD"] == "GET" and (
            "list-type" in query or path.strip("/").count("/") == 0
        )
        counter.add(environ["REQUEST_METHOD"], listing)
        if delay_s:
            time.sleep(delay_s)
        return app(environ, start_response)

    return wrapped


class S3Server:
    """moto's S3-compatible server in a background thread, on 127.0.0.1."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, delay_s: float = 0.0) -> None:
        self.host, self.port, self.delay_s = host, port, delay_s
        self.requests = RequestCounter()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> S3Server:
        """Bind (port 0 picks a free one) and serve in a daemon thread."""
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        class QuietHandler(MotoRequestHandler):
            def log_request(
                self, *args: object
            ) -> None:  # one line per request drowns the task log
                pass

        class S3Only(DomainDispatcherApplication):
            """Every request to moto's S3 app, built once (moto's own `/moto-api` as moto routes
            it): moto's dispatcher otherwise matches each request's signed host against every AWS
            service's URL patterns, under a lock, about a millisecond of CPU per request."""

            s3_app = create_backend_app("s3")

            def get_application(self, environ: dict[str, Any]) -> Any:
                if environ.get("PATH_INFO", "").startswith("/moto-api"):
                    return super().get_application(environ)
                return self.s3_app

        app = _middleware(S3Only(create_backend_app), self.delay_s, self.requests)
        self._server = make_server(
            self.host, self.port, app, threaded=True, request_handler=QuietHandler
        )
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        log.info("Local S3 server listening on %s", self.endpoint_url)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(host: str = "127.0.0.1", port: int = 9000, delay_s: float = 0.0) -> None:
    """Run the local S3 server in the foreground until interrupted (the demo's `s3-server`)."""
    with S3Server(host, port, delay_s) as server:
        print(f"Local S3 server on {server.endpoint_url} (Ctrl-C stops it)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


def airflow(
    args: list[str],
    environ: dict[str, str],
    quiet: bool = False,
    log_file: Path | None = None,
    on_line: Callable[[str], None] | None = None,
) -> None:
    """Run the `airflow` CLI of this interpreter's environment; raise with its output on failure.

    With `log_file`, the output is kept in that file and, as it comes, handed to `on_line` (shown
    as it is when there is no `on_line`).
    """
    cmd = [str(Path(sys.executable).with_name("airflow")), *args]
    if log_file is None:
        proc = subprocess.run(cmd, env=environ, capture_output=quiet, text=True)
        returncode, detail = proc.returncode, ""
        if quiet:
            detail = (proc.stdout or "")[-4000:] + (proc.stderr or "")[-4000:]
    else:
        with (
            open(log_file, "w") as out,
            subprocess.Popen(
                cmd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            ) as proc,
        ):
            for line in proc.stdout or ():
                out.write(line)
                if on_line is None:
                    sys.stdout.write(line)
                else:
                    out.flush()  # the diagnosis may read it the moment the run fails
                    on_line(line)
        returncode, detail = proc.returncode, ""
    if returncode != 0:
        raise RuntimeError(
            f"`airflow {' '.join(args)}` failed with exit code {returncode}\n{detail}"
        )
