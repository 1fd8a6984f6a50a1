#!/usr/bin/env bash
# Builds the local test agent images without any registry (docs/containers.md):
#   windshift-test-agent:dev        labelled org.windshift.agent-contract=v1 (the one tests use)
#   windshift-test-agent:unlabeled  the same rootfs without the contract label
#   windshift-test-agent:v0         the same rootfs with a wrong contract label ("v0")
# The rootfs is assembled from this machine: the statically linked agent, the host's git binary
# with the shared libraries ldd lists, /etc/passwd with uid 1000 `agent`, and empty dirs.
# Idempotent: a content hash of the rootfs is stored as a label; nothing is rebuilt when the
# images already carry the same hash. Set WSR_DOCKER to use another CLI (e.g. podman).
set -euo pipefail
cd "$(dirname "$0")/.."
SELF="$PWD/scripts/build-test-agent-image.sh"
DOCKER="${WSR_DOCKER:-${WSRUNNER_DOCKER:-docker}}"
IMAGE="windshift-test-agent"
TARGET=x86_64-unknown-linux-gnu

# Static glibc build (the musl target is not installed here). The test agent never resolves
# names, so static glibc's NSS caveat does not apply.
RUSTFLAGS='-C target-feature=+crt-static' cargo build --quiet --release -p windshift-test-agent --target "$TARGET"
AGENT_BIN="target/$TARGET/release/windshift-test-agent"

GIT_BIN="$(command -v git)"
GIT_EXEC_PATH="$("$GIT_BIN" --exec-path)"

ROOTFS="$(mktemp -d)"
trap 'rm -rf "$ROOTFS"' EXIT
# mktemp makes the dir 0700 and the tar's "./" entry carries that mode: Docker's and rootful
# Podman's overlay roots ignore it, but rootless Podman's store keeps it, and uid 1000 could
# then not reach /usr/local/bin ("stat ...: permission denied").
chmod 0755 "$ROOTFS"
mkdir -p "$ROOTFS"/{usr/local/bin,etc,workspace,home/agent,tmp,proc,sys,dev}
chmod 1777 "$ROOTFS/tmp"
install -m 0755 "$AGENT_BIN" "$ROOTFS/usr/local/bin/windshift-test-agent"
# git at the same path as on the host so its compiled-in exec path and templates resolve.
mkdir -p "$ROOTFS$(dirname "$GIT_BIN")" "$ROOTFS$GIT_EXEC_PATH"
cp -L "$GIT_BIN" "$ROOTFS$GIT_BIN"
[ "$GIT_BIN" = /usr/local/bin/git ] || ln -sf "$GIT_BIN" "$ROOTFS/usr/local/bin/git"
# add/commit are builtins; the exec path only needs the git binary itself for re-execs.
ln -sf "$GIT_BIN" "$ROOTFS$GIT_EXEC_PATH/git"
for lib in $(ldd "$GIT_BIN" | awk '/=>/ {print $3} /^\t\// {print $1}'); do
  mkdir -p "$ROOTFS$(dirname "$lib")"
  cp -L "$lib" "$ROOTFS$lib"
done
cat > "$ROOTFS/etc/passwd" <<'PW'
root:x:0:0:root:/root:/sbin/nologin
agent:x:1000:1000:agent:/home/agent:/sbin/nologin
PW
cat > "$ROOTFS/etc/group" <<'GR'
root:x:0:
agent:x:1000:
GR
chown 1000:1000 "$ROOTFS/home/agent" "$ROOTFS/workspace"
# Docker 20.10 gives a --tmpfs mount the mode of the image directory it covers (its own
# mode=1777 is overridden) and root ownership, so the home dir must be 1777 in the image.
chmod 1777 "$ROOTFS/home/agent"

# Content hash of the rootfs (paths, modes and bytes) plus this script.
HASH="$( (cd "$ROOTFS" && find . -print0 | LC_ALL=C sort -z | xargs -0 stat -c '%n %a %u' ; \
          cd "$ROOTFS" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum; \
          cat "$SELF") | sha256sum | cut -c1-32)"

current_hash() {
  "$DOCKER" image inspect --format '{{index .Config.Labels "org.windshift.test-agent.hash"}}' "$1" 2>/dev/null || true
}

build() { # build TAG CONTRACT-LABEL-VALUE (empty: no label)
  local tag="$1" contract_label="$2"
  if [ "$(current_hash "$IMAGE:$tag")" = "$HASH" ]; then
    echo "test agent image $IMAGE:$tag is up to date ($HASH)"
    return
  fi
  # docker import (not a Dockerfile COPY) keeps the rootfs ownership: /home/agent belongs to
  # uid 1000 like in the real agent image, which the /home/agent tmpfs copy-up inherits.
  local changes=(--change 'ENV HOME=/home/agent' --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin'
    --change 'USER 1000:1000' --change 'WORKDIR /workspace'
    --change 'ENTRYPOINT ["/usr/local/bin/windshift-test-agent"]'
    --change "LABEL org.windshift.test-agent.hash=$HASH")
  if [ -n "$contract_label" ]; then
    changes+=(--change "LABEL org.windshift.agent-contract=$contract_label")
  fi
  local log
  if ! log="$(tar -C "$ROOTFS" --numeric-owner --sort=name --mtime=@0 -cf - . \
      | "$DOCKER" import "${changes[@]}" - "$IMAGE:$tag" 2>&1)"; then
    echo "$log" >&2
    echo "building $IMAGE:$tag failed" >&2
    exit 1
  fi
  echo "built test agent image $IMAGE:$tag ($HASH)"
}

build dev v1
build unlabeled ''
build v0 v0
