"""A screenshot of the review form as a haematologist sees it in Airflow's UI (docs/img/).

Everything runs in a temporary folder, removed at the end: a moto S3 server on loopback holding a
few synthetic smears (blends of two classes) and fake Grad-CAM overlays, queued for review with
`review.enqueue` as scoring would (no model is trained); `airflow dags test leukemia_review`
against a SQLite Airflow home, which opens the form and waits in Required Actions; `airflow
api-server` on a free port of 127.0.0.1 (simple auth manager, everyone admin: no login); headless
Chromium on the task's Required Actions page. Then every process it started is stopped (the form is
never answered) and the PNG's path is printed.

    .venv/bin/python tools/review_screenshot.py [--out docs/img/review_form.png]

Needs Chromium (`--chromium`, default /usr/bin/chromium). Development tooling.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from leukemia.config import project_root

BUCKET = "leukemia-review-demo"
SIZE = 96
#: The referred images: (file name, the class that dominates, the class blended in, probabilities
#: (Benign, Early, Pre, Pro), prediction set, why referred).
REFERRALS = (
    ("smear-0412.jpg", "Pre", "Pro", (0.01, 0.06, 0.52, 0.41), "Pre|Pro", "prediction set Pre|Pro"),
    (
        "smear-0415.jpg",
        "Early",
        "Pre",
        (0.04, 0.55, 0.38, 0.03),
        "Early|Pre",
        "prediction set Early|Pre",
    ),
    (
        "smear-0421.jpg",
        "Benign",
        "Early",
        (0.61, 0.36, 0.02, 0.01),
        "Benign|Early",
        "prediction set Benign|Early",
    ),
)


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _jpeg(image: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=92)
    return out.getvalue()


def _png(image: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _smear_and_overlay(major: str, minor: str, rng: Any) -> tuple[bytes, bytes]:
    """A 60/40 blend of two classes' smears (JPEG) and a fake Grad-CAM overlay of it (PNG)."""
    import numpy as np
    from PIL import Image

    from leukemia.dev.synthetic import render_smear

    a = np.asarray(render_smear(major, rng, SIZE), dtype="float32")
    b = np.asarray(render_smear(minor, rng, SIZE), dtype="float32")
    smear = (0.6 * a + 0.4 * b).clip(0, 255)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    cy, cx = rng.uniform(0.3, 0.7, 2)
    heat = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.03)[..., None]
    colour = np.concatenate([heat, np.sqrt(heat) * 0.8, 1 - heat], axis=-1) * 255
    overlay = (0.55 * smear + 0.45 * colour).clip(0, 255)
    return (
        _jpeg(Image.fromarray(smear.astype("uint8"))),
        _png(Image.fromarray(overlay.astype("uint8"))),
    )


def seed_bucket(endpoint_url: str) -> int:
    """Create the bucket, upload the referred smears and overlays, queue them; how many queued."""
    import boto3
    import numpy as np

    from leukemia import review
    from leukemia.dev.embedded import LOCAL_ACCESS_KEY, LOCAL_REGION, LOCAL_SECRET_KEY

    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=LOCAL_ACCESS_KEY,
        aws_secret_access_key=LOCAL_SECRET_KEY,
        region_name=LOCAL_REGION,
    )
    client.create_bucket(Bucket=BUCKET)
    rng = np.random.default_rng(24)
    referrals = []
    for name, major, minor, probs, prediction_set, reason in REFERRALS:
        image, overlay = _smear_and_overlay(major, minor, rng)
        key, overlay_key = f"incoming/{name}", f"predictions/gradcam/{Path(name).stem}.png"
        client.put_object(Bucket=BUCKET, Key=key, Body=image, ContentType="image/jpeg")
        client.put_object(Bucket=BUCKET, Key=overlay_key, Body=overlay, ContentType="image/png")
        probabilities = dict(zip(("Benign", "Early", "Pre", "Pro"), probs, strict=True))
        predicted = max(probabilities, key=probabilities.__getitem__)
        referrals.append(
            review.Referral(
                sha256=hashlib.sha256(image).hexdigest(),
                key=key,
                bucket=BUCKET,
                probabilities=probabilities,
                prediction_set=prediction_set,
                predicted=predicted,
                confidence=probabilities[predicted],
                refer_reason=reason,
                model_version="7",
                overlay_key=overlay_key,
                scored_at="2026-03-02T09:14:00+00:00",
            )
        )
    return review.enqueue(client, BUCKET, referrals)


def _airflow() -> str:
    return str(Path(sys.executable).with_name("airflow"))


@contextlib.contextmanager
def started(cmd: list[str], environ: dict[str, str], log_file: Path) -> Iterator[Any]:
    """Run `cmd` in its own process group (output to `log_file`); stop that group on exit."""
    with log_file.open("w") as out:
        proc = subprocess.Popen(
            cmd, env=environ, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)  # `dags test` waiting for input ignores SIGTERM
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)


def _tail(log_file: Path, lines: int = 30) -> str:
    return "\n".join(log_file.read_text(errors="replace").splitlines()[-lines:])


def wait_for_form(db: Path, proc: Any, log_file: Path, timeout_s: float = 300) -> str:
    """The run id once the `review` task waits for an answer; an error with the log otherwise."""
    from leukemia.dev.hitl import parked_run

    run_id = parked_run(
        db, "leukemia_review", "review", timeout_s, ended=lambda: proc.poll() is not None
    )
    if run_id is None:
        raise RuntimeError(f"the review form did not open:\n{_tail(log_file)}")
    return run_id


def wait_for_server(base_url: str, proc: Any, log_file: Path, timeout_s: float = 180) -> None:
    """Until the API server answers its health check."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"airflow api-server exited:\n{_tail(log_file)}")
        with contextlib.suppress(urllib.error.URLError, OSError):
            with urllib.request.urlopen(f"{base_url}/api/v2/monitor/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        time.sleep(1)
    raise TimeoutError(f"airflow api-server did not answer in {timeout_s:g} s:\n{_tail(log_file)}")


def screenshot(chromium: str, url: str, png: Path, workdir: Path, size: tuple[int, int]) -> None:
    """Headless Chromium's screenshot of `url` (its profile inside `workdir`)."""
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={workdir / 'chromium'}",
        f"--window-size={size[0]},{size[1]}",
        "--virtual-time-budget=30000",
        f"--screenshot={png}",
        url,
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    if not png.is_file():
        raise RuntimeError(f"Chromium wrote no screenshot of {url}")


def shrink(raw: Path, out: Path, width: int | None) -> None:
    """Save `raw` as a palette PNG (a small file) at `out`, `width` pixels wide (None: as is)."""
    from PIL import Image

    image = Image.open(raw).convert("RGB")
    if width and width != image.width:
        height = round(image.height * width / image.width)
        image = image.resize((width, height), Image.LANCZOS)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)


def capture(args: argparse.Namespace, workdir: Path) -> Path:
    """The whole sequence in `workdir`; the PNG written."""
    from leukemia.dev.demo import embedded_env
    from leukemia.dev.embedded import S3Server

    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    with S3Server() as s3:
        environ = {
            **embedded_env(workdir, s3.endpoint_url),
            "LEUKEMIA_BUCKET": BUCKET,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API__BASE_URL": base_url,
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        }
        home = Path(environ["AIRFLOW_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        subprocess.run([_airflow(), "db", "migrate"], env=environ, check=True, capture_output=True)
        print(f"Queued {seed_bucket(s3.endpoint_url)} referred images", flush=True)
        dag_log, api_log = workdir / "dags_test.log", workdir / "api_server.log"
        dag_cmd = [_airflow(), "dags", "test", "leukemia_review"]
        api_cmd = [_airflow(), "api-server", "--host", "127.0.0.1", "--port", str(port), "-w", "1"]
        with started(dag_cmd, environ, dag_log) as dag_test:
            run_id = wait_for_form(home / "airflow.db", dag_test, dag_log)
            with started(api_cmd, environ, api_log) as api:
                wait_for_server(base_url, api, api_log)
                url = (
                    f"{base_url}/dags/leukemia_review/runs/{quote(run_id, safe='')}"
                    "/tasks/review/required_actions"
                )
                print(f"Form open: {url}", flush=True)
                raw = workdir / "raw.png"
                screenshot(args.chromium, url, raw, workdir, (args.width, args.height))
    shrink(raw, args.out, args.scale_to)
    return args.out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=project_root() / "docs/img/review_form.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--width", type=int, default=1400, help="browser window width (px)")
    parser.add_argument("--height", type=int, default=1100, help="browser window height (px)")
    parser.add_argument(
        "--scale-to", type=int, help="width of the saved PNG (px; default: as shot)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="review-screenshot-"))
    try:
        out = capture(args, workdir)
    finally:
        if args.keep:
            print(f"Kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(out.resolve())


if __name__ == "__main__":
    main()
