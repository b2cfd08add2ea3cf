#!/usr/bin/env bash
# Installs what is missing, then prints the iptables rules minikproxy would install on node-a
# of the bundled example cluster (examples/cluster: Services of every type, their
# EndpointSlices, and the Node).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/minikproxy render -f examples/cluster --config examples/kube-proxy-config.yaml "$@"
