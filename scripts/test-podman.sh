#!/usr/bin/env bash
# Runs the container tests (engine, sandbox, JSONL driver, cancel, re-attach) and the daemon's
# crash-recovery, lifecycle (cancel, drain) and verdict tests again with rootful Podman, plus
# daemon_podman's own end-to-end check (docs/containers.md), in two passes: through the podman
# CLI (WSRUNNER_ENGINE_DRIVER=cli), then through Podman's API service, which this script starts
# itself (`podman system service`, no systemd) and stops at the end. A third leg runs
# daemon_podman's rootless test as a throwaway non-root user (WSR_ROOTLESS_USER, default
# wsr-rootless, created with subordinate uid/gid ranges if missing) against that user's own
# rootless Podman; it is skipped, saying why, where the host cannot run rootless containers.
# Called by scripts/test.sh when `podman` is installed; `.ci/run` installs it.
# Extra arguments go to cargo nextest / cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v podman >/dev/null 2>&1; then
  echo "test-podman: podman is not installed (apt-get install podman); skipping the Podman pass" >&2
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "test-podman: needs root (rootful passes, and it creates the rootless leg's user); skipping" >&2
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
ROOTLESS_TMP=""
cleanup() {
  if [ -n "$SERVICE_PID" ]; then kill "$SERVICE_PID" 2>/dev/null || true; wait "$SERVICE_PID" 2>/dev/null || true; fi
  rm -rf "$CONF_DIR"
  [ -z "$ROOTLESS_TMP" ] || rm -rf "$ROOTLESS_TMP"
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
  --test daemon_hostile --test daemon_session --test container_hardening
  --test daemon_input --test daemon_journal_budget)
# daemon_podman's test is #[ignore]d in the Docker pass; these binaries have no other ignored test.
# SKIPS: test names left out of a pass (passed after `--`, as libtest's --skip).
# The rootless test runs in leg 3 only (it needs a non-root user).
SKIPS=(--skip rootless_podman_agent_writes_its_checkout_and_the_run_succeeds)
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
# or not), so an agent cannot outlive the attaching runner there: the four tests of exactly
# that (and the crash before a start is journaled, whose agent must finish unwatched) are left
# out of this pass (docs/containers.md); `auto` picks the CLI for Podman.
# The output-limit verdict test is left out too: through Podman's API the killed agent's
# exit is judged as the end of its handshake (row 3 instead of row 7; an open item in
# docs/containers.md). Both stay in pass 1.
SKIPS=(--skip rootless_podman_agent_writes_its_checkout_and_the_run_succeeds
  --skip reattach_after_the_driver_dies_collects_the_rest
  --skip crash_while_the_container_runs_reattaches_and_keeps_the_work
  --skip crash_before_the_start_is_journaled_judges_the_exit_on_the_agents_output
  --skip sigkill_of_the_runner_mid_run_keeps_the_agents_session
  --skip a_crash_past_the_budget_keeps_the_coalesced_finish_on_reattach
  --skip output_past_the_limit_fails_the_run_naming_the_variable)
WSRUNNER_ENGINE_DRIVER=api run_tests "$@" || status=$?

# Leg 3: rootless Podman (docs/containers.md, "Rootless Podman"). The test binary is built
# here, as root, then run as the throwaway user, whose podman keeps its own store under its
# home: the daemon it starts drives that rootless podman through the CLI driver.
rootless_skip() {
  echo "test-podman: rootless leg SKIPPED: $*" >&2
}
rootless_leg() {
  local user="${WSR_ROOTLESS_USER:-wsr-rootless}"
  if ! command -v newuidmap >/dev/null 2>&1 || ! command -v newgidmap >/dev/null 2>&1; then
    rootless_skip "newuidmap/newgidmap are missing (apt-get install uidmap)"; return 0
  fi
  if ! id "$user" >/dev/null 2>&1; then
    useradd --create-home --shell /usr/sbin/nologin "$user"
  fi
  local uid home
  uid="$(id -u "$user")"
  home="$(getent passwd "$user" | cut -d: -f6)"
  # A subordinate range for the user (useradd adds one where login.defs says so), placed
  # after every range already handed out so that no two users share host uids.
  local file next
  for file in /etc/subuid /etc/subgid; do
    touch "$file"
    if ! grep -q "^$user:" "$file"; then
      next="$(awk -F: 'BEGIN { m = 100000 } { e = $2 + $3; if (e > m) m = e } END { print m }' "$file")"
      echo "$user:$next:65536" >> "$file"
    fi
  done
  mkdir -p "/run/user/$uid"
  chown "$user:" "/run/user/$uid"
  chmod 0700 "/run/user/$uid"
  local as_user=(runuser -u "$user" -- env -i PATH=/usr/local/bin:/usr/bin:/bin
    HOME="$home" XDG_RUNTIME_DIR="/run/user/$uid")
  if ! "${as_user[@]}" podman info --format '{{.Host.Security.Rootless}}' 2>/dev/null | grep -qx true; then
    rootless_skip "podman as $user is not rootless or does not start: $("${as_user[@]}" podman info 2>&1 | tail -1)"; return 0
  fi
  # The same test image, in the user's own store (podman load reads a docker save archive).
  ROOTLESS_TMP="$(mktemp -d)"
  chmod 0755 "$ROOTLESS_TMP"
  local want have
  want="$(docker image inspect --format '{{.Id}}' windshift-test-agent:dev | sed 's/^sha256://')"
  have="$("${as_user[@]}" podman image inspect --format '{{.Id}}' windshift-test-agent:dev 2>/dev/null || true)"
  if [ "$want" != "$have" ]; then
    docker save windshift-test-agent:dev -o "$ROOTLESS_TMP/agent.tar"
    chmod 0644 "$ROOTLESS_TMP/agent.tar"
    "${as_user[@]}" podman load -q -i "$ROOTLESS_TMP/agent.tar" >/dev/null
  fi
  # Can this host start a rootless container at all? (No network: the tests use `none`.)
  local probe
  if ! probe="$("${as_user[@]}" podman run --rm --network=none --user=1000:1000 \
      --userns=keep-id:uid=1000,gid=1000 --entrypoint /usr/local/bin/git \
      windshift-test-agent:dev --version 2>&1)"; then
    case "$probe" in
      *"stat /usr/local/bin/git: permission denied"*)
        # Not the host: an image whose "/" is 0700 (built before the build script's chmod).
        echo "test-podman: windshift-test-agent:dev has a 0700 root dir; rebuild it with scripts/build-test-agent-image.sh" >&2
        return 1 ;;
    esac
    rootless_skip "a rootless container does not start here: $(echo "$probe" | tail -1)"; return 0
  fi
  local bin
  bin="$(cargo test -p windshift-runner --test daemon_podman --no-run --message-format=json 2>/dev/null \
    | sed -n 's/.*"executable":"\([^"]*daemon_podman[^"]*\)".*/\1/p' | tail -1)"
  if [ -z "$bin" ]; then
    echo "test-podman: building the daemon_podman test binary failed" >&2; return 1
  fi
  if ! "${as_user[@]}" test -x "$bin"; then
    rootless_skip "$user cannot run $bin (make the checkout's directories world-traversable)"; return 0
  fi
  echo "test-podman: leg 3, rootless Podman as $user (uid $uid), the CLI driver" >&2
  (cd "$ROOTLESS_TMP" && "${as_user[@]}" WSR_TEST_ENGINE=podman WSRUNNER_DOCKER=podman \
    WSRUNNER_ENGINE_DRIVER=cli "$bin" --ignored --exact \
    rootless_podman_agent_writes_its_checkout_and_the_run_succeeds)
}
rootless_leg || status=$?
exit "$status"
