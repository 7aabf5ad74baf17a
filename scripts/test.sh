#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine, then run it.
# System packages (sshd, iproute2, rsync) are installed only when missing and only as root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = "0" ]; then
  bash scripts/install-system-deps.sh
fi
python3 -m pip install -q -e ".[test]"
exec python3 -m pytest -q "$@"
