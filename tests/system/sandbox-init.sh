#!/usr/bin/env bash
# Boots systemd as PID 1 of new namespaces (see tests/system/sandbox.py, which runs it).
#   sandbox-init.sh outer CGROUP DISK ROOT NAME [SHARED...]
# "outer" runs in the harness's mount namespace (where DISK, the tmpfs holding the
# overlay's upper layer, is mounted): it moves itself into CGROUP, a fresh directory of the
# host's cgroup2 hierarchy that becomes the root of the new cgroup namespace, and becomes
# "inner", PID 1 of new PID, mount, UTS, IPC, network and cgroup namespaces. "inner" builds
# the machine's file system under ROOT (an overlay of the host's / with DISK's upper layer,
# its own /proc, /sys, /dev, /run and /tmp; SHARED host directories bound read-only at
# the same path), pivots into it and becomes systemd.
set -euo pipefail

stage=$1
shift
if [[ $stage == outer ]]; then
    cgroup=$1
    shift
    echo $$ >"$cgroup/cgroup.procs"
    # --kill-child: when unshare dies (the harness's process died and took it along via
    # PR_SET_PDEATHSIG), so does the namespace's PID 1, and with it every process inside.
    exec unshare --pid --fork --kill-child=SIGKILL --mount --uts --ipc --net --cgroup \
        --propagation private -- "$0" inner "$@"
fi

disk=$1 root=$2 name=$3
shift 3

mount -t overlay overlay -o "lowerdir=/,upperdir=$disk/upper,workdir=$disk/work" "$root"

mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
# The kernel's non-namespaced sysctls belong to the host: /proc/sys is read-only inside
# (systemd-sysctl.service then skips itself), except the network namespace's own.
mount --bind "$root/proc/sys/net" "$root/proc/sys/net"
mount --rbind "$root/proc/sys" "$root/proc/sys"
mount -o remount,bind,ro "$root/proc/sys"
if [[ -e $root/proc/sysrq-trigger ]]; then
    mount --bind "$root/proc/sysrq-trigger" "$root/proc/sysrq-trigger"
    mount -o remount,bind,ro "$root/proc/sysrq-trigger"
fi

# A fresh sysfs shows this network namespace's devices; read-only, so systemd-udevd and
# friends skip themselves. The cgroup2 mount shows the cgroup namespace's root only.
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$root/sys/fs/cgroup"

mount -t tmpfs -o mode=0755,nosuid,size=4m tmpfs "$root/dev"
for device in null zero full random urandom tty; do
    touch "$root/dev/$device"
    mount --bind "/dev/$device" "$root/dev/$device"
done
mkdir "$root/dev/pts" "$root/dev/shm" "$root/dev/mqueue"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5,nosuid,noexec devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/dev/shm"
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"

# Fresh at every boot, like a machine's: the host's /run and /tmp are never seen.
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$root/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/tmp"

for shared in "$@"; do
    mkdir -p "$root$shared"
    mount --bind "$shared" "$root$shared"
    mount -o remount,bind,ro "$root$shared"
done

hostname "$name"
cd "$root"
# The old root goes under the new one and is detached at once: nothing of the host's
# mount tree stays reachable inside.
pivot_root . .
umount -l .
cd /
exec env -i container="$name" PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    /lib/systemd/systemd --unit=multi-user.target
