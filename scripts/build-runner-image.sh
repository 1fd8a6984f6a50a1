#!/usr/bin/env bash
# Builds the runner container image offline from this machine (docs/deploy.md):
#   1. release binaries on the host (cargo build --release; a no-op when up to date),
#   2. the local base image (deploy/build-base-image.sh; cached by content hash),
#   3. deploy/Dockerfile with BINARIES=prebuilt and every base set to the local base,
# tagged windshift-runner:local (override with RUNNER_TAG). Nothing is rebuilt when the
# binaries, the Dockerfile and the base are unchanged (a hash label on the image).
# WSR_SKIP_CARGO=1 uses the binaries already in target/release.
set -euo pipefail
cd "$(dirname "$0")/.."
DOCKER="${WSR_DOCKER:-docker}"
RUNNER_TAG="${RUNNER_TAG:-windshift-runner:local}"
export BASE_TAG="${BASE_TAG:-windshift-runner-base:local}"
export DOCKER_CLI_TAG="${DOCKER_CLI_TAG:-windshift-runner-docker-cli:local}"
HASH_LABEL="org.windshift.runner-image.hash"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"

if [ "${WSR_SKIP_CARGO:-0}" != 1 ]; then
  cargo build --quiet --release --bin windshift-runner --bin windshift-triage
fi
for bin in windshift-runner windshift-triage; do
  [ -x "$TARGET_DIR/release/$bin" ] || { echo "build-runner-image: $TARGET_DIR/release/$bin is missing; run cargo build --release" >&2; exit 1; }
done
deploy/build-base-image.sh

base_id="$("$DOCKER" image inspect --format '{{.Id}}' "$BASE_TAG" "$DOCKER_CLI_TAG")"
HASH="$( (sha256sum "$TARGET_DIR/release/windshift-runner" "$TARGET_DIR/release/windshift-triage" deploy/Dockerfile "$0" | cut -d' ' -f1; echo "$base_id") | sha256sum | cut -c1-32)"
current="$("$DOCKER" image inspect --format "{{index .Config.Labels \"$HASH_LABEL\"}}" "$RUNNER_TAG" 2>/dev/null || true)"
if [ "$current" = "$HASH" ]; then
  echo "runner image $RUNNER_TAG is up to date ($HASH)"
  exit 0
fi

CONTEXT="$(mktemp -d)"
trap 'rm -rf "$CONTEXT"' EXIT
mkdir -p "$CONTEXT/dist"
cp deploy/Dockerfile "$CONTEXT/Dockerfile"
cp "$TARGET_DIR/release/windshift-runner" "$TARGET_DIR/release/windshift-triage" "$CONTEXT/dist/"
# The release profile keeps debug info; the image does not need it.
if command -v strip >/dev/null 2>&1; then strip --strip-debug "$CONTEXT"/dist/*; fi
# The classic builder: the CLI here has no buildx, and the Dockerfile keeps every stage's base
# a build argument so nothing is pulled.
DOCKER_BUILDKIT=0 "$DOCKER" build --quiet \
  --build-arg BINARIES=prebuilt \
  --build-arg BUILDER_IMAGE="$BASE_TAG" \
  --build-arg DOCKER_CLI_IMAGE="$DOCKER_CLI_TAG" \
  --build-arg BASE_IMAGE="$BASE_TAG" \
  --label "$HASH_LABEL=$HASH" \
  -t "$RUNNER_TAG" "$CONTEXT" >/dev/null
echo "built runner image $RUNNER_TAG ($HASH)"
