"""The README's test command does its own set-up: `make test` installs the stack test's servers."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "test-services.sh"


def test_ci_runs_exactly_make_test() -> None:
    commands = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))
    ]
    assert commands == ["make test"]


def test_make_test_installs_the_stack_servers_before_pytest() -> None:
    recipe = subprocess.run(
        ["make", "-n", "test", "VENV=/nonexistent-venv-for-dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()
    services = next(i for i, line in enumerate(recipe) if "tools/test-services.sh" in line)
    pytest_line = next(i for i, line in enumerate(recipe) if "-m pytest" in line)
    assert services < pytest_line


def test_missing_servers_that_cannot_be_installed_here_say_what_to_install(tmp_path: Path) -> None:
    """A PATH without redis-server, initdb or apt-get: one line naming the packages, exit 1."""
    result = _run_with_only(tmp_path, {})
    if os.path.isdir("/usr/lib/postgresql") and any(
        Path("/usr/lib/postgresql").glob("*/bin/initdb")
    ):
        expected = "test services missing: redis-server;"
    else:
        expected = "test services missing: redis-server postgresql;"
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert "apt-get install" in lines[0]


def test_with_both_servers_present_the_set_up_does_nothing(tmp_path: Path) -> None:
    fake = "#!/bin/sh\necho ran >&2; exit 3\n"
    result = _run_with_only(tmp_path, {t: fake for t in ("redis-server", "initdb", "apt-get")})
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def _run_with_only(tmp_path: Path, fakes: dict[str, str]) -> subprocess.CompletedProcess:
    """The script with a PATH of bash, id and the given fake programs (name -> script) only."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "id"):
        real = subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip()
        (bin_dir / tool).symlink_to(real)
    for name, script in fakes.items():
        (bin_dir / name).write_text(script)
        (bin_dir / name).chmod(0o755)
    return subprocess.run(
        [str(bin_dir / "bash"), str(SCRIPT)],
        env={"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        check=False,
    )
