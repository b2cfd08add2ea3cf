#!/usr/bin/env bash
# Installs what is missing, then runs the linters and the whole test suite, kernel tests
# included (they need root: network namespaces, iptables, conntrack).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# One command per line: `set -e` does not stop on a failure inside an `a && b` list.
echo "== ruff"
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
