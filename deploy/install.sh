#!/usr/bin/env bash
# Installs windshift-runner as a systemd service. Idempotent: re-running upgrades the binaries
# and the unit, and never overwrites an existing runner.env. See docs/deploy.md.
#
#   sudo ./install.sh --bin-dir ./dist            install (and enable, not start)
#   sudo ./install.sh --uninstall                 remove unit, binaries (keeps config and state
#                                                 unless --purge)
#   sudo ./install.sh --root /tmp/x --bin-dir …   install into a throwaway root (packaging, tests)
set -euo pipefail

prog=install.sh
bin_dir=""
prefix=/usr/local/bin
state_dir=/var/lib/windshift-runner
user=windshift-runner
enable=1
uninstall=0
purge=0
root="${DESTDIR:-}"

die() { echo "$prog: $*" >&2; exit 1; }
usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  cat <<EOT
Options:
  --bin-dir DIR    directory holding windshift-runner and windshift-triage
                   (default: this script's directory, if it holds both)
  --prefix DIR     where the binaries go (default /usr/local/bin)
  --cache-dir DIR  bare-clone cache root (default /var/lib/windshift-runner/cache); the journal
                   and state live in its parent
  --user NAME      service user (default windshift-runner)
  --no-enable      install without enabling the unit
  --root DIR       install below DIR instead of / (also: DESTDIR=DIR)
  --uninstall      remove the unit and binaries; add --purge to also remove config and state
EOT
}

while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir="${2:?--bin-dir needs a directory}"; shift 2 ;;
    --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
    --cache-dir) state_dir="$(dirname "${2:?--cache-dir needs a directory}")"
                 [ "$(basename "$2")" = cache ] || die "--cache-dir must end in /cache (the journal and credential live beside it), got $2"
                 shift 2 ;;
    --user) user="${2:?--user needs a name}"; shift 2 ;;
    --no-enable) enable=0; shift ;;
    --root) root="${2:?--root needs a directory}"; shift 2 ;;
    --uninstall) uninstall=1; shift ;;
    --purge) purge=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done

case "$prefix$state_dir" in *[[:space:]]*) die "paths must not contain white space" ;; esac
case "$prefix" in /*) ;; *) die "--prefix must be absolute: $prefix" ;; esac
case "$state_dir" in /*) ;; *) die "--cache-dir must be absolute" ;; esac
[[ "$user" =~ ^[a-z_][a-z0-9_-]*$ ]] || die "--user must be a valid user name: $user"
[ "$(id -u)" -eq 0 ] || die "must run as root (try: sudo ./$prog …)"
if [ -n "$root" ]; then
  [ -d "$root" ] || die "--root $root does not exist"
  root="$(cd "$root" && pwd)"
  [ "$root" = / ] && root=""
fi

unit_path="$root/etc/systemd/system/windshift-runner.service"
etc_dir="$root/etc/windshift-runner"
systemctl_root=()
[ -n "$root" ] && systemctl_root=(--root="$root")

if [ "$uninstall" -eq 1 ]; then
  if [ -z "$root" ] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now windshift-runner.service 2>/dev/null || true
  elif [ -f "$unit_path" ]; then
    systemctl "${systemctl_root[@]}" disable windshift-runner.service 2>/dev/null || true
  fi
  rm -f "$unit_path" "$root$prefix/windshift-runner" "$root$prefix/windshift-triage"
  if [ "$purge" -eq 1 ]; then
    rm -rf "$etc_dir" "$root$state_dir"
  fi
  [ -z "$root" ] && command -v systemctl >/dev/null 2>&1 && systemctl daemon-reload || true
  echo "windshift-runner uninstalled."
  [ "$purge" -eq 1 ] || echo "Kept $etc_dir and $root$state_dir (credential, journal, cache); add --purge to remove them."
  echo "The user '$user' was kept; remove it with: userdel $user"
  exit 0
fi

# Prerequisites, each with the fix.
if [ -z "$root" ]; then
  command -v systemctl >/dev/null 2>&1 || die "systemctl not found: this installer needs systemd (run the runner as a container instead, see docs/deploy.md)"
  command -v docker >/dev/null 2>&1 || die "docker not found: install Docker Engine (or a rootful podman providing 'docker') first"
  command -v git >/dev/null 2>&1 || die "git not found: install it (apt-get install git)"
fi
if [ -z "$bin_dir" ]; then
  here="$(cd "$(dirname "$0")" && pwd)"
  if [ -x "$here/windshift-runner" ] && [ -x "$here/windshift-triage" ]; then
    bin_dir="$here"
  else
    die "--bin-dir is required: the directory holding windshift-runner and windshift-triage"
  fi
fi
for b in windshift-runner windshift-triage; do
  [ -x "$bin_dir/$b" ] || die "$bin_dir/$b is missing or not executable"
done

# The service user, in the docker group (docker access is root-equivalent: dedicate the host).
user_root=()
[ -n "$root" ] && user_root=(--root "$root")
grep -q "^docker:" "$root/etc/group" 2>/dev/null || die "no 'docker' group in $root/etc/group: install Docker Engine first"
if ! grep -q "^$user:" "$root/etc/passwd" 2>/dev/null; then
  useradd "${user_root[@]}" --system --no-create-home --home-dir "$state_dir" \
    --shell /usr/sbin/nologin --user-group "$user"
  echo "created system user $user"
fi
if ! grep -Eq "^docker:[^:]*:[^:]*:(.*,)?$user(,|\$)" "$root/etc/group"; then
  usermod "${user_root[@]}" -a -G docker "$user"
fi
echo "warning: $user is in the docker group, which is root-equivalent on this host; run agents on dedicated machines." >&2

install -d -m 0755 "$root$prefix"
install -m 0755 "$bin_dir/windshift-runner" "$root$prefix/windshift-runner"
install -m 0755 "$bin_dir/windshift-triage" "$root$prefix/windshift-triage"

install -d -m 0700 "$root$state_dir" "$root$state_dir/cache" "$root$state_dir/journal"
# Numeric ids from the target root's own user database (the host's may not know the user).
uid="$(grep "^$user:" "$root/etc/passwd" | cut -d: -f3)"
gid="$(grep "^$user:" "$root/etc/passwd" | cut -d: -f4)"
chown "$uid:$gid" "$root$state_dir" "$root$state_dir/cache" "$root$state_dir/journal"

install -d -m 0750 "$etc_dir"
chown "0:$gid" "$etc_dir"
src_dir="$(cd "$(dirname "$0")" && pwd)"
if [ ! -e "$etc_dir/runner.env" ]; then
  # Holds the registration token: readable by root and the service group only.
  install -m 0640 -o 0 -g "$gid" "$src_dir/runner.env.example" "$etc_dir/runner.env"
  echo "wrote $etc_dir/runner.env (edit it: WS_API_URL, WSRUNNER_REGISTRATION_TOKEN, WSRUNNER_IMAGE)"
else
  echo "kept existing $etc_dir/runner.env"
fi

install -d -m 0755 "$(dirname "$unit_path")"
tmp_unit="$(mktemp)"
trap 'rm -f "$tmp_unit"' EXIT
sed -e "s|@BINDIR@|$prefix|g" -e "s|@USER@|$user|g" -e "s|@STATEDIR@|$state_dir|g" \
  "$src_dir/windshift-runner.service" > "$tmp_unit"
install -m 0644 "$tmp_unit" "$unit_path"

if [ -z "$root" ]; then
  systemctl daemon-reload
fi
if [ "$enable" -eq 1 ]; then
  systemctl "${systemctl_root[@]}" enable windshift-runner.service >/dev/null 2>&1 \
    || die "systemctl enable windshift-runner.service failed"
  echo "enabled windshift-runner.service (not started)"
fi

cat <<EOT

windshift-runner installed. Next steps:
  1. Edit $etc_dir/runner.env: WS_API_URL, WSRUNNER_REGISTRATION_TOKEN, WSRUNNER_IMAGE
  2. Make the agent image available to Docker:  docker pull <WSRUNNER_IMAGE>
  3. Check the host:   sudo -u $user $prefix/windshift-runner doctor
  4. Start it:         systemctl start windshift-runner
  5. Follow the log:   journalctl -u windshift-runner -f
     (look for "registered as instance N in pool M", then "worker started")
EOT
