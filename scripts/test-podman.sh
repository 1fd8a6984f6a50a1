#!/usr/bin/env bash
# Runs the container tests (engine, sandbox, JSONL driver, cancel, re-attach) and the daemon's
# crash-recovery, lifecycle (cancel, drain) and verdict tests again with rootful Podman, plus
# daemon_podman's own end-to-end check (docs/containers.md), in two passes: through the podman
# CLI (WSRUNNER_ENGINE_DRIVER=cli), then through Podman's API service, which this script starts
# itself (`podman system service`, no systemd) and stops at the end.
# Called by scripts/test.sh when `podman` is installed; `.ci/run` installs it.
# Extra arguments go to cargo nextest / cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v podman >/dev/null 2>&1; then
  echo "test-podman: podman is not installed (apt-get install podman); skipping the Podman pass" >&2
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "test-podman: needs root (the runner supports rootful Podman only); skipping" >&2
  exit 0
fi

# The test images are built by Docker (scripts/build-test-agent-image.sh); copy them into
# Podman's store when their ids differ, so the Podman pass runs the very same rootfs.
for tag in dev unlabeled v0; do
  ref="windshift-test-agent:$tag"
  want="$(docker image inspect --format '{{.Id}}' "$ref" | sed 's/^sha256://')"
  have="$(podman image inspect --format '{{.Id}}' "$ref" 2>/dev/null || true)"
  if [ "$want" != "$have" ]; then
    docker save "$ref" | podman load -q >/dev/null
  fi
done

# Podman asks the OCI runtime for nofile/nproc limits of about a million. A root without
# CAP_SYS_RESOURCE (a nested or sandboxed host, like this CI machine) cannot raise its limits,
# so runc refuses every container ("error setting rlimits ... operation not permitted").
# Pin the defaults below what this process may set: nofile at its own hard limit, nproc at
# 32000 (here runc refused anything above ~32768 even though `ulimit -Hu` says 96364). The
# tests' per-container process cap is --pids-limit, which these values do not touch.
nproc_hard="$(ulimit -Hu)"
[ "$nproc_hard" = unlimited ] || [ "$nproc_hard" -gt 32000 ] && nproc_hard=32000
CONF_DIR="$(mktemp -d)"
SERVICE_PID=""
cleanup() {
  if [ -n "$SERVICE_PID" ]; then kill "$SERVICE_PID" 2>/dev/null || true; wait "$SERVICE_PID" 2>/dev/null || true; fi
  rm -rf "$CONF_DIR"
}
trap cleanup EXIT
cat > "$CONF_DIR/containers.conf" <<EOF
[containers]
default_ulimits = [
  "nofile=$(ulimit -Hn):$(ulimit -Hn)",
  "nproc=$nproc_hard:$nproc_hard",
]
EOF
export CONTAINERS_CONF="$CONF_DIR/containers.conf"

export WSR_TEST_ENGINE=podman
export WSRUNNER_DOCKER=podman
tests=(--test container_engine --test container_sandbox --test container_driver
  --test daemon_crash --test daemon_lifecycle --test daemon_verdicts --test daemon_podman
  --test daemon_hostile --test daemon_session --test container_hardening)
# daemon_podman's test is #[ignore]d in the Docker pass; these binaries have no other ignored test.
# SKIPS: test names left out of a pass (passed after `--`, as libtest's --skip).
SKIPS=()
run_tests() {
  if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run -p windshift-runner --no-fail-fast --run-ignored all "${tests[@]}" "$@" -- "${SKIPS[@]}"
  else
    cargo test -p windshift-runner --no-fail-fast "${tests[@]}" "$@" -- --include-ignored "${SKIPS[@]}"
  fi
}
status=0

echo "test-podman: pass 1, the CLI driver (podman CLI)" >&2
WSRUNNER_ENGINE_DRIVER=cli run_tests "$@" || status=$?

# Pass 2: the API driver on Podman's own service at its default rootful socket (the runner
# finds it there for WSRUNNER_DOCKER=podman). A service that already answers is used as is.
SOCK=/run/podman/podman.sock
if ! podman --url "unix://$SOCK" version >/dev/null 2>&1; then
  mkdir -p /run/podman
  podman system service --time=0 "unix://$SOCK" &
  SERVICE_PID=$!
  for _ in $(seq 1 100); do
    podman --url "unix://$SOCK" version >/dev/null 2>&1 && break
    sleep 0.1
  done
fi
if ! podman --url "unix://$SOCK" version >/dev/null 2>&1; then
  echo "test-podman: Podman's API service did not answer on $SOCK" >&2
  exit 1
fi
echo "test-podman: pass 2, the API driver (podman system service on $SOCK)" >&2
# Podman 4.3's API closes a container's stdin when the attached client goes (StdinOnce=false
# or not), so an agent cannot outlive the attaching runner there: the three tests of exactly
# that are left out of this pass (docs/containers.md); `auto` picks the CLI for Podman.
# The output-limit verdict test is left out too: through Podman's API the killed agent's
# exit is judged as the end of its handshake (row 3 instead of row 7; an open item in
# docs/containers.md). Both stay in pass 1.
SKIPS=(--skip reattach_after_the_driver_dies_collects_the_rest
  --skip crash_while_the_container_runs_reattaches_and_keeps_the_work
  --skip sigkill_of_the_runner_mid_run_keeps_the_agents_session
  --skip output_past_the_limit_fails_the_run_naming_the_variable)
WSRUNNER_ENGINE_DRIVER=api run_tests "$@" || status=$?
exit "$status"
