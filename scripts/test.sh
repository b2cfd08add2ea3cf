#!/usr/bin/env bash
# Installs what is missing, then runs the linters and the whole test suite, kernel tests
# included (they need root: network namespaces, iptables, conntrack), then the container image
# test (scripts/image-test.sh: builds the image with podman and runs it as the DaemonSet).
# With arguments, only pytest runs, with those arguments (e.g. a file or -k EXPR).
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
.venv/bin/python -m pytest -p no:cacheprovider "$@"
if [ $# -eq 0 ]; then
    echo "== image"
    exec bash scripts/image-test.sh
fi
