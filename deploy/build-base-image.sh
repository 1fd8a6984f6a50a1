#!/usr/bin/env bash
# Builds a minimal runner base image from THIS machine's files, for hosts without a registry
# (docs/deploy.md, "Building the image offline"). The image holds what the runner needs at
# run time besides its own two binaries:
#   - /bin/sh (dash) and a few coreutils (cp, mkdir, rm, ls, cat, ...) for the Dockerfile's RUN
#   - git with its git-core helpers (git-remote-http/https included) and their libraries
#   - CA certificates, a minimal passwd/group, /tmp
# and is imported with `docker import` as windshift-runner-base:local (override with
# BASE_TAG). The docker CLI goes into a second image, windshift-runner-docker-cli:local
# (DOCKER_CLI_TAG), at /usr/local/bin/docker like the official docker:cli image, for the
# Dockerfile's DOCKER_CLI_IMAGE. (Keeping it out of the base matters: the classic builder of
# Docker 20.10 fails with "layer does not exist" when a COPY changes nothing.)
# Idempotent: a content hash of each rootfs is stored as a label, and nothing is re-imported
# when the image already carries it.
#
# Usage: deploy/build-base-image.sh            (WSR_DOCKER=podman to use another CLI)
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
DOCKER="${WSR_DOCKER:-docker}"
BASE_TAG="${BASE_TAG:-windshift-runner-base:local}"
DOCKER_CLI_TAG="${DOCKER_CLI_TAG:-windshift-runner-docker-cli:local}"
HASH_LABEL="org.windshift.runner-base.hash"

need() { command -v "$1" >/dev/null 2>&1 || { echo "build-base-image: $1 is required on this machine ($2)" >&2; exit 1; }; }
need git "apt install git"
need ldd "libc-bin"
need "$DOCKER" "install docker or set WSR_DOCKER"
DOCKER_BIN="$(command -v docker || true)"
[ -n "$DOCKER_BIN" ] || { echo "build-base-image: the docker CLI binary is needed to copy into the image" >&2; exit 1; }
GIT_BIN="$(command -v git)"
GIT_EXEC_PATH="$(git --exec-path)"
SH_BIN="$(readlink -f /bin/sh)"
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
[ -f "$CA_BUNDLE" ] || { echo "build-base-image: $CA_BUNDLE missing (apt install ca-certificates)" >&2; exit 1; }

ROOTFS="$(mktemp -d)"
CLI_ROOTFS="$(mktemp -d)"
trap 'rm -rf "$ROOTFS" "$CLI_ROOTFS"' EXIT
# A merged-/usr layout like Debian's, so ldd's /lib/... paths land in /usr/lib/...
mkdir -p "$ROOTFS"/usr/{bin,sbin,lib,lib64,local/bin} "$ROOTFS"/{etc/ssl/certs,tmp,root,proc,sys,dev,var/lib/windshift-runner}
for d in bin sbin lib lib64; do ln -s "usr/$d" "$ROOTFS/$d"; done
chmod 1777 "$ROOTFS/tmp"
chmod 0700 "$ROOTFS/root" "$ROOTFS/var/lib/windshift-runner"

copy_file() { # copy_file SRC: same path in the rootfs, symlinks resolved
  local src="$1" dst="$ROOTFS$1"
  mkdir -p "$(dirname "$dst")"
  cp -L "$src" "$dst"
}

ELFS=()
# The shell and the handful of tools a Dockerfile RUN or an operator's `docker exec` needs.
copy_file "$SH_BIN"
[ "$SH_BIN" = /usr/bin/sh ] || ln -sf "$SH_BIN" "$ROOTFS/usr/bin/sh"
ELFS+=("$SH_BIN")
for tool in cp mkdir rm ls cat chmod chown id env mv ln sleep; do
  p="$(command -v "$tool")"
  copy_file "$p"
  ELFS+=("$p")
done
# git at its own path (its compiled-in exec path and templates must resolve) and every
# git-core helper; cp -a keeps the helpers' hard links and symlinks, so this stays small.
copy_file "$GIT_BIN"
ELFS+=("$GIT_BIN")
mkdir -p "$ROOTFS$(dirname "$GIT_EXEC_PATH")"
cp -a "$GIT_EXEC_PATH" "$ROOTFS$(dirname "$GIT_EXEC_PATH")/"
while IFS= read -r -d '' f; do ELFS+=("$f"); done < <(find "$GIT_EXEC_PATH" -type f -perm -u+x -print0)
[ -d /usr/share/git-core/templates ] && { mkdir -p "$ROOTFS/usr/share/git-core"; cp -a /usr/share/git-core/templates "$ROOTFS/usr/share/git-core/"; }
# The docker CLI where the official docker:cli image keeps it (its libraries go in the base).
mkdir -p "$CLI_ROOTFS/usr/local/bin"
cp -L "$DOCKER_BIN" "$CLI_ROOTFS/usr/local/bin/docker"
ELFS+=("$DOCKER_BIN")

# Rust binaries (the runner, triage) link libgcc_s and libm besides libc.
for lib in libgcc_s.so.1 libm.so.6; do
  # awk reads all of ldconfig's output (no early exit): an early exit makes ldconfig die of
  # SIGPIPE, which pipefail turns into a failed build (CI saw exit code 141).
  cache="$(ldconfig -p)"
  path="$(awk -v l="$lib" '$1 == l && /x86-64|x86_64|64bit/ && !found {print $NF; found=1}' <<<"$cache")"
  [ -n "$path" ] || path="$(awk -v l="$lib" '$1 == l && !found {print $NF; found=1}' <<<"$cache")"
  [ -n "$path" ] || { echo "build-base-image: $lib not found (ldconfig -p)" >&2; exit 1; }
  copy_file "$path"
done
# Shared libraries of everything above (scripts among the helpers have none: ldd fails).
for elf in "${ELFS[@]}"; do
  { ldd "$elf" 2>/dev/null || true; } | awk '/=>/ && $3 ~ /^\// {print $3} /^\t\// {print $1}'
done | sort -u | while read -r lib; do
  [ -e "$ROOTFS$lib" ] || copy_file "$lib"
done

cp -L "$CA_BUNDLE" "$ROOTFS$CA_BUNDLE"
cat > "$ROOTFS/etc/passwd" <<'PW'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
PW
cat > "$ROOTFS/etc/group" <<'GR'
root:x:0:
nogroup:x:65534:
GR
printf 'passwd: files\ngroup: files\nhosts: files dns\n' > "$ROOTFS/etc/nsswitch.conf"

import_rootfs() { # import_rootfs DIR TAG LABEL [--change ...]
  local dir="$1" tag="$2" label="$3"; shift 3
  # Content hash of the rootfs (paths, modes, owners and bytes) plus this script.
  local hash current
  hash="$( (cd "$dir" && find . -print0 | LC_ALL=C sort -z | xargs -0 stat -c '%n %a %u' ; \
            cd "$dir" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum; \
            cat "$SELF") | sha256sum | cut -c1-32)"
  current="$("$DOCKER" image inspect --format "{{index .Config.Labels \"$label\"}}" "$tag" 2>/dev/null || true)"
  if [ "$current" = "$hash" ]; then
    echo "image $tag is up to date ($hash)"
    return
  fi
  tar -C "$dir" --numeric-owner --sort=name --mtime=@0 -cf - . \
    | "$DOCKER" import "$@" --change "LABEL $label=$hash" - "$tag" >/dev/null
  echo "built image $tag ($hash)"
}

import_rootfs "$ROOTFS" "$BASE_TAG" "$HASH_LABEL" \
  --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' \
  --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt'
import_rootfs "$CLI_ROOTFS" "$DOCKER_CLI_TAG" "$HASH_LABEL"
