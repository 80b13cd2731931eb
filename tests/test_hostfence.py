"""The fence that makes one machine's folders stand for separate hosts (leukemia.dev.hostfence)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from leukemia.dev.hostfence import marker_path, read_log, sitecustomize_source

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, os, shutil, sys
from pathlib import Path

results = {}
def attempt(name, action):
    try:
        action()
        results[name] = "ok"
    except FileNotFoundError as exc:
        results[name] = "not found: " + str(exc)

mine, theirs = Path(sys.argv[1]), Path(sys.argv[2])
attempt("write own", lambda: (mine / "data" / "x.txt").write_text("mine"))
attempt("read own", lambda: (mine / "data" / "x.txt").read_text())
attempt("read theirs", lambda: (theirs / "data" / "y.txt").read_text())
attempt("list theirs", lambda: os.listdir(theirs / "data"))
attempt("write theirs", lambda: (theirs / "data" / "z.txt").write_text("no"))
attempt("copy theirs", lambda: shutil.copyfile(theirs / "data" / "y.txt", mine / "data" / "y.txt"))
attempt("outside the stack", lambda: Path(sys.argv[3]).read_text())
print(json.dumps(results))
"""


def _fenced_python(stack: Path, host: str, outside: Path) -> dict[str, str]:
    """Run PROBE as `host` of a stack whose folders are <stack>/workers/<name>."""
    import json

    mine = stack / "workers" / host
    site = mine / "site"
    site.mkdir(parents=True)
    (mine / "data").mkdir()
    (site / "sitecustomize.py").write_text(sitecustomize_source())
    environ = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(ROOT / "include")]),
        "LEUKEMIA_STACK_HOST": host,
        "LEUKEMIA_FENCE_ROOT": str(stack),
        "LEUKEMIA_FENCE_ALLOW": str(mine),
        "LEUKEMIA_FENCE_LOG": str(mine / "fence.jsonl"),
        "AIRFLOW_CTX_TASK_ID": "build_split",
    }
    theirs = stack / "workers" / "worker-b"
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(mine), str(theirs), str(outside)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_fence_hides_other_workers_folders_and_logs_each_attempt(tmp_path: Path) -> None:
    stack = tmp_path / "stack"
    (stack / "workers" / "worker-b" / "data").mkdir(parents=True)
    (stack / "workers" / "worker-b" / "data" / "y.txt").write_text("written by worker-b")
    outside = tmp_path / "code.txt"
    outside.write_text("the project's code, on every host")

    results = _fenced_python(stack, "worker-a", outside)

    assert results["write own"] == results["read own"] == "ok"
    assert results["outside the stack"] == "ok"
    for name in ("read theirs", "list theirs", "write theirs", "copy theirs"):
        assert results[name].startswith("not found: "), (name, results[name])
        assert "not on this host (worker-a)" in results[name]
    assert not (stack / "workers" / "worker-b" / "data" / "z.txt").exists()
    hits = read_log(stack / "workers" / "worker-a" / "fence.jsonl")
    assert [(h["host"], h["event"], h["task_id"]) for h in hits] == [
        ("worker-a", "open", "build_split"),
        ("worker-a", "os.listdir", "build_split"),
        ("worker-a", "open", "build_split"),
        ("worker-a", "shutil.copyfile", "build_split"),
    ]
    assert all(h["path"].startswith(str(stack / "workers" / "worker-b")) for h in hits)
    assert marker_path(stack / "workers" / "worker-a" / "fence.jsonl").is_file()


def test_no_fence_without_its_settings(tmp_path: Path) -> None:
    """The same sitecustomize is inert where the stack did not configure a fence."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(sitecustomize_source())
    other = tmp_path / "other.txt"
    other.write_text("readable")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LEUKEMIA_FENCE")}
    environ["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT / "include")])
    proc = subprocess.run(
        [sys.executable, "-c", f"print(open({str(other)!r}).read())"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "readable", proc.stderr


def test_hostname_is_the_stack_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from leukemia.dev.hostfence import hostname

    monkeypatch.setenv("LEUKEMIA_STACK_HOST", "worker-b")
    assert hostname() == "worker-b"
    monkeypatch.delenv("LEUKEMIA_STACK_HOST")
    assert hostname()  # the machine's own name
