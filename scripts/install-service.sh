#!/usr/bin/env bash
# Install (or upgrade) libra-worker as a systemd service on Debian 12, from this checkout:
#   sudo scripts/install-service.sh               install or upgrade on this machine
#   scripts/install-service.sh --root DIR         stage the same files under DIR only
#                                                 (no apt, no system user, no systemctl)
# It installs haproxy, gearman-tools, python3-venv and logrotate with apt; creates the
# system user and group `libra` (no login, home /var/lib/libra-worker); installs the
# package into the virtualenv /opt/libra-worker; puts the config into /etc/libra-worker/
# (an existing one is never overwritten: the new reference goes beside it as *.dist; one
# from before the units existed gets `[haproxy] supervisor = systemd`), the units
# (libra-worker.service, libra-haproxy.service, libra-logsink.socket/.service, libra.target)
# into /etc/systemd/system/, the logrotate file into /etc/logrotate.d/ and a sysctl file
# that lets HAProxy queue log lines while the sink is busy. Running it again is harmless;
# an upgrade keeps config and state and restarts nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
checkout=$(pwd)

root=""
while (( $# )); do
    case $1 in
        --root) root=$(realpath -m "${2:?--root needs a directory}"); shift 2 ;;
        --root=*) root=$(realpath -m "${1#--root=}"); shift ;;
        -h|--help) sed -n '2,11s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "install-service: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

user=libra
prefix=/opt/libra-worker
config_dir=/etc/libra-worker
state_dir=/var/lib/libra-worker
log_dir=/var/log/libra-worker
packages=(haproxy gearman-tools python3-venv logrotate)

if [[ -z $root && $(id -u) -ne 0 ]]; then
    echo "install-service: run it as root (sudo scripts/install-service.sh)," \
         "or stage it with --root DIR" >&2
    exit 2
fi

if [[ -z $root ]]; then
    bash scripts/apt-install.sh install-service "${packages[@]}"
    getent group "$user" >/dev/null || groupadd --system "$user"
    getent passwd "$user" >/dev/null || useradd --system --gid "$user" \
        --home-dir "$state_dir" --no-create-home --shell /usr/sbin/nologin \
        --comment "libra-worker load-balancer agent" "$user"
    owner=(-o "$user" -g "$user")
    config_owner=(-o root -g "$user")
else
    # A staging root has no system user: its files keep the caller's ownership.
    owner=()
    config_owner=()
fi

# The package's own virtualenv: Debian's Python refuses `pip install` outside one (PEP 668).
# Debian's python3, not whichever is first on PATH: the service user must be able to run
# it. A virtualenv whose Python is gone (a distribution upgrade) is made again.
if ! "$root$prefix/bin/python" -c "" 2>/dev/null; then
    /usr/bin/python3 -m venv --clear "$root$prefix"
fi
# Built from a copy: pip builds in the source tree, and root-owned build/ and *.egg-info
# left in the operator's checkout would break a later `pip install .` there.
source=$(mktemp -d)
trap 'rm -rf "$source"' EXIT
tar -C "$checkout" --exclude=./.git --exclude=./.venv --exclude=./.tox --exclude=./build \
    --exclude=./dist --exclude=./run --exclude='*.egg-info' -cf - . | tar -C "$source" -xf -
"$root$prefix/bin/pip" install --quiet --disable-pip-version-check --upgrade "$source"
# The installed package carries the files below; installing them from it keeps the unit,
# logrotate file and reference config of one version together.
shipped=$("$root$prefix/bin/python" -I -c \
    'from importlib.resources import files; print(files("libra_worker") / "etc")')

install -d -m 0755 "$root$config_dir" "$root/etc/systemd/system" "$root/etc/logrotate.d" \
    "$root/etc/sysctl.d"
for name in libra-worker.conf logging.conf; do
    if [[ -e $root$config_dir/$name ]]; then
        # The operator's file stays; the new reference is there to compare with.
        install -m 0640 "${config_owner[@]}" "$shipped/$name" "$root$config_dir/$name.dist"
    else
        install -m 0640 "${config_owner[@]}" "$shipped/$name" "$root$config_dir/$name"
    fi
done
# A config from before the units existed would make the worker start its own HAProxy
# beside libra-haproxy.service's.
if ! grep -Eq '^[[:space:]]*supervisor[[:space:]]*=' "$root$config_dir/libra-worker.conf"; then
    if grep -Eq '^[[:space:]]*\[haproxy\]' "$root$config_dir/libra-worker.conf"; then
        sed -i -E 's/^[[:space:]]*\[haproxy\].*/&\nsupervisor = systemd/' \
            "$root$config_dir/libra-worker.conf"
    else
        printf '\n[haproxy]\nsupervisor = systemd\n' >> "$root$config_dir/libra-worker.conf"
    fi
    echo "install-service: added [haproxy] supervisor = systemd to $config_dir/libra-worker.conf"
fi
for unit in libra-worker.service libra-haproxy.service libra-logsink.socket \
            libra-logsink.service libra.target; do
    install -m 0644 "$shipped/$unit" "$root/etc/systemd/system/$unit"
done
install -m 0644 "$shipped/libra-worker.logrotate" "$root/etc/logrotate.d/libra-worker"
install -m 0644 "$shipped/libra-worker.sysctl" "$root/etc/sysctl.d/60-libra-worker.conf"
# systemd creates these too (StateDirectory=, LogsDirectory=); a daemon started without
# systemd needs them as well. logs/ holds the sink's socket, which libra-logsink.socket
# makes as root: the directory must already be the service user's.
install -d -m 0750 "${owner[@]}" "$root$state_dir" "$root$log_dir"
install -d -m 0700 "${owner[@]}" "$root$state_dir/logs"

version=$("$root$prefix/bin/libra-worker" --version)
if [[ -n $root ]]; then
    echo "install-service: $version staged under $root"
    exit 0
fi
sysctl -q -p /etc/sysctl.d/60-libra-worker.conf 2>/dev/null \
    || echo "install-service: could not apply /etc/sysctl.d/60-libra-worker.conf now (applied at boot)"
# A machine without a running systemd has nothing to reload.
if [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
fi
echo "install-service: $version installed in $prefix"
echo "  config:  $config_dir/libra-worker.conf (set [gearman] servers first)"
echo "  start:   sudo systemctl enable --now libra.target   (the worker, HAProxy, the log sink)"
echo "  upgrade: sudo systemctl restart libra-worker libra-logsink   (HAProxy keeps serving)"
echo "  status:  systemctl status libra-worker libra-haproxy libra-logsink"
echo "  logs:    journalctl -u libra-worker -u libra-haproxy -u libra-logsink"
echo "  stop everything: sudo systemctl stop libra.target"
