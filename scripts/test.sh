#!/usr/bin/env bash
# The project's test command (README): builds what the tests need, then runs every test.
# Needs: the Rust toolchain, git, a running Docker daemon.
set -euo pipefail
cd "$(dirname "$0")/.."

# Tests that run containers use the locally built test agent image (no registry here).
if [ -x scripts/build-test-agent-image.sh ]; then
  scripts/build-test-agent-image.sh
fi

status=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@" || status=$?
else
  cargo test --workspace --no-fail-fast "$@" || status=$?
fi

# The same container and daemon tests again with rootful Podman, when it is installed and no
# test filter was given (a filtered run is someone chasing one test).
if [ $# -eq 0 ]; then
  scripts/test-podman.sh || status=$?
fi
exit "$status"
