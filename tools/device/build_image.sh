#!/usr/bin/env bash
# Build the emulated arm64 device that `make device-check` boots.
#
#   tools/device/build_image.sh [--force]
#
# Debian 12 arm64 from Debian's packages (debootstrap, second stage under
# qemu-user), systemd as PID 1, Mosquitto, Python 3.11, openssh-server (the
# host drives the device over a loopback-forwarded port), Debian's arm64
# kernel installed without its initrd (mkinitramfs under qemu-user takes
# ~26 min) plus a tiny busybox initrd built here that loads the virtio and
# ext4 modules, and the arm64 wheels edged needs, fetched from PyPI on this
# host, so the device itself needs no network.
#
# Everything goes to $EDGED_DEVICE_CACHE (default /var/cache/edged-device),
# outside the repository:
#   rootfs.img   ext4 disk image (booted with snapshot=on: never modified)
#   vmlinuz, initrd.img, id_ed25519(.pub), wheels/, wheels-tflite/, stamp
# The stamp holds a hash of this script and of the wheel lists: when either
# changes the next run rebuilds. --force (or deleting the folder) rebuilds
# from nothing. Needs root, debootstrap, qemu-user-static,
# e2fsprogs, cpio (tools/device/check.py installs them with apt-get).
set -euo pipefail

CACHE=${EDGED_DEVICE_CACHE:-/var/cache/edged-device}
SUITE=bookworm
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
IMAGE_MB=${EDGED_DEVICE_IMAGE_MB:-3072}
# What the device gets from Debian. python3-venv: install.sh makes a venv;
# make: `make install`; strace: the worker trace; dbus: systemd-analyze and
# systemctl as a user has them; kmod/udev: modules of the real kernel.
PACKAGES=systemd,systemd-sysv,udev,dbus,kmod,procps,iproute2,openssh-server,python3,python3-venv,make,mosquitto,strace,libseccomp2,ca-certificates
# The wheels, for CPython 3.11 on aarch64 glibc 2.36 (Debian 12).
LITERT_REQS=(ai-edge-litert numpy "pillow>=10" "paho-mqtt>=2.0,<3" "pyyaml>=6" "pyseccomp>=0.1.2" "psutil>=5.9" "setuptools>=68" wheel)
TFLITE_REQS=(tflite-runtime "numpy<2" "pillow>=10" "paho-mqtt>=2.0,<3" "pyyaml>=6" "pyseccomp>=0.1.2" "psutil>=5.9" "setuptools>=68" wheel)

say() { printf 'device-image: %s\n' "$*" >&2; }
die() { printf 'device-image: error: %s\n' "$*" >&2; exit 1; }

stamp_now() {
    { sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1; printf '%s\n' "$PACKAGES" "${LITERT_REQS[@]}" "${TFLITE_REQS[@]}"; } | sha256sum | cut -d' ' -f1
}

if [[ ${1:-} != --force && -f $CACHE/stamp && $(cat "$CACHE/stamp") == "$(stamp_now)" && -f $CACHE/rootfs.img ]]; then
    say "cached image in $CACHE is current"
    exit 0
fi
[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap, chroot)"
for tool in debootstrap qemu-aarch64-static mkfs.ext4 cpio; do
    command -v "$tool" >/dev/null || die "$tool missing (apt-get install debootstrap qemu-user-static e2fsprogs cpio)"
done
[[ -x $PY ]] || die "$PY missing (run make's venv step first, or set PYTHON=)"
T0=$(date +%s)
mkdir -p "$CACHE"
rm -f "$CACHE/stamp" "$CACHE/rootfs.img"

# --- wheels (host, PyPI) --------------------------------------------------------
# ai-edge-litert 2.x is tagged manylinux_2_27 only, so every tag up to
# Debian 12's glibc is listed (manylinux2014 alone silently gives 1.4.0).
platforms=()
for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_aarch64"); done
platforms+=(--platform manylinux2014_aarch64)
fetch_wheels() {  # DIR REQS...
    local dir=$1; shift
    rm -rf "$dir.tmp"
    "$PY" -m pip download -q --disable-pip-version-check --only-binary=:all: --python-version 3.11 \
        --implementation cp --abi cp311 --abi abi3 --abi none "${platforms[@]}" --platform any \
        -d "$dir.tmp" "$@"
    rm -rf "$dir"; mv "$dir.tmp" "$dir"
}
say "fetching arm64 wheels into $CACHE/wheels and $CACHE/wheels-tflite"
fetch_wheels "$CACHE/wheels" "${LITERT_REQS[@]}" &
wheels_pid=$!
# tflite-runtime may have no wheel for this Python/arch: then the device
# check reports that and why, instead of failing the image.
( fetch_wheels "$CACHE/wheels-tflite" "${TFLITE_REQS[@]}" 2>"$CACHE/wheels-tflite.log" \
    || { rm -rf "$CACHE/wheels-tflite"; say "no tflite-runtime wheel set (see $CACHE/wheels-tflite.log)"; } ) &
tflite_pid=$!

# --- root file system (debootstrap) -------------------------------------------
# The mirror is the one this host's apt uses, so the device matches the host's
# Debian; MIRROR= overrides.
MIRROR=${MIRROR:-$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1)}
MIRROR=${MIRROR:-$(awk '$1 == "deb" && $2 !~ /\[/ && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)}
[[ -n $MIRROR ]] || die "no Debian mirror found in this host's apt sources; set MIRROR=URL"
ROOTFS=$CACHE/rootfs
rm -rf "$ROOTFS"
say "debootstrap $SUITE arm64 (first stage) from this host's Debian mirror"
debootstrap --arch=arm64 --variant=minbase --foreign --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || die "debootstrap failed; see $CACHE/debootstrap.log"

# The second stage runs arm64 binaries: qemu-user through binfmt_misc. What
# this script mounted or registered it takes away again at exit.
BINFMT=/proc/sys/fs/binfmt_misc
mounted_binfmt=0 registered=0
cleanup() {
    for m in proc sys dev/pts dev; do mountpoint -q "$ROOTFS/$m" 2>/dev/null && umount -l "$ROOTFS/$m"; done
    (( registered )) && echo -1 > "$BINFMT/qemu-aarch64" 2>/dev/null
    (( mounted_binfmt )) && umount "$BINFMT" 2>/dev/null
    return 0
}
trap cleanup EXIT
if [[ ! -e $BINFMT/register ]]; then mount -t binfmt_misc binfmt_misc "$BINFMT"; mounted_binfmt=1; fi
if [[ ! -e $BINFMT/qemu-aarch64 ]]; then
    conf=/usr/lib/binfmt.d/qemu-aarch64.conf
    [[ -f $conf ]] || die "$conf missing (qemu-user-static)"
    cat "$conf" > "$BINFMT/register"   # flag F: the interpreter is opened now, none needed in the chroot
    registered=1
fi
say "debootstrap second stage under qemu-user (~5 min)"
chroot "$ROOTFS" /debootstrap/debootstrap --second-stage >>"$CACHE/debootstrap.log" 2>&1 \
    || die "debootstrap second stage failed; see $CACHE/debootstrap.log ($ROOTFS/debootstrap/debootstrap.log)"
mount -t proc proc "$ROOTFS/proc"
in_root() { chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 "$@"; }

# --- kernel without initramfs-tools -----------------------------------------------
printf 'deb %s %s main\n' "$MIRROR" "$SUITE" > "$ROOTFS/etc/apt/sources.list"
in_root apt-get -q update >>"$CACHE/debootstrap.log" 2>&1
kpkg=$(in_root apt-cache depends linux-image-arm64 | sed -n 's/^ *Depends: \(linux-image-[0-9].*-arm64\)$/\1/p' | head -1)
[[ -n $kpkg ]] || die "could not find the kernel package behind linux-image-arm64"
say "kernel $kpkg (unpacked without its postinst: no mkinitramfs under emulation)"
in_root sh -c "cd /tmp && apt-get -q download $kpkg busybox-static" >>"$CACHE/debootstrap.log" 2>&1
# the initrd's shell: arm64 busybox, not installed in the device itself
mkdir -p "$CACHE/busybox.d"
dpkg -x "$ROOTFS"/tmp/busybox-static_*.deb "$CACHE/busybox.d"
# --keep-directory-symlink: /lib is a symlink to usr/lib (merged /usr); plain dpkg -x would replace it
dpkg-deb --fsys-tarfile "$ROOTFS"/tmp/"$kpkg"_*.deb | tar -x --keep-directory-symlink -C "$ROOTFS"
rm -f "$ROOTFS"/tmp/*.deb
KVER=${kpkg#linux-image-}
in_root depmod -a "$KVER"
cp "$ROOTFS/boot/vmlinuz-$KVER" "$CACHE/vmlinuz"

# --- configuration ----------------------------------------------------------------
echo edged-device > "$ROOTFS/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tedged-device\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$ROOTFS/etc/hosts"
printf '/dev/vda\t/\text4\tdefaults,noatime\t0\t1\n' > "$ROOTFS/etc/fstab"
: > "$ROOTFS/etc/machine-id"     # generated at each boot (the disk is a snapshot)
mkdir -p "$ROOTFS/etc/systemd/network"
printf '[Match]\nName=e*\n\n[Network]\nDHCP=ipv4\n' > "$ROOTFS/etc/systemd/network/10-wired.network"
in_root systemctl enable systemd-networkd.service >/dev/null 2>&1
in_root systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer man-db.timer \
    systemd-networkd-wait-online.service >/dev/null 2>&1 || true
# network-online.target without waiting for DHCP (the broker is local).
# Serial console: root logs in without a password (debugging only; the
# emulated device has no other users and the host reaches it on loopback).
mkdir -p "$ROOTFS/etc/systemd/system/serial-getty@ttyAMA0.service.d"
printf '[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin root --keep-baud 115200 %%I $TERM\n' \
    > "$ROOTFS/etc/systemd/system/serial-getty@ttyAMA0.service.d/autologin.conf"
# Mosquitto: a device takes frames from the network, so it listens on every
# interface (Debian's default is loopback only); anonymous like the tests.
printf 'listener 1883\nallow_anonymous true\n' > "$ROOTFS/etc/mosquitto/conf.d/edged-device.conf"
# ssh: root by key only (Debian's default PermitRootLogin prohibit-password).
rm -f "$CACHE/id_ed25519" "$CACHE/id_ed25519.pub"
ssh-keygen -q -t ed25519 -N '' -C edged-device-check -f "$CACHE/id_ed25519"
install -d -m 0700 "$ROOTFS/root/.ssh"
install -m 0600 "$CACHE/id_ed25519.pub" "$ROOTFS/root/.ssh/authorized_keys"
printf 'UseDNS no\n' > "$ROOTFS/etc/ssh/sshd_config.d/edged-device.conf"
in_root apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/locale/*
umount -l "$ROOTFS/proc"

wait "$wheels_pid" || die "pip download of the arm64 wheels failed"
wait "$tflite_pid" || true
cp -r "$CACHE/wheels" "$ROOTFS/root/wheels"
[[ -d $CACHE/wheels-tflite ]] && cp -r "$CACHE/wheels-tflite" "$ROOTFS/root/wheels-tflite"

# --- initrd: busybox + the modules to reach the root disk -----------------------
say "initrd (busybox, virtio and ext4 modules)"
INITRD=$CACHE/initrd.d
rm -rf "$INITRD"; mkdir -p "$INITRD"/{bin,dev,proc,sys,newroot,lib/modules}
cp "$CACHE/busybox.d/bin/busybox" "$INITRD/bin/busybox"
rm -rf "$CACHE/busybox.d"
for a in sh mount umount switch_root insmod sleep cat mkdir echo; do ln -s busybox "$INITRD/bin/$a"; done
MODDIR=$ROOTFS/lib/modules/$KVER
modorder=()
add_module() {  # NAME: its dependencies first, then itself (nothing if built in)
    local name=$1 line path dep
    line=$(grep -E "(^|/)${name//[-_]/[-_]}\.ko(\.[a-z]+)?:" "$MODDIR/modules.dep" | head -1) || true
    [[ -n $line ]] || return 0
    path=${line%%:*}
    for p in "${modorder[@]}"; do [[ $p == "$path" ]] && return 0; done
    for dep in ${line#*:}; do add_module "$(basename "$dep" | sed 's/\.ko.*//')"; done
    modorder+=("$path")
}
for m in virtio_mmio virtio_pci virtio_blk crc32c_generic crc32c-arm64-ce ext4; do add_module "$m"; done
: > "$INITRD/modules"
for path in "${modorder[@]}"; do
    base=$(basename "$path")
    case $base in
        *.ko.xz) xz -dc "$MODDIR/$path" > "$INITRD/lib/modules/${base%.xz}"; base=${base%.xz} ;;
        *.ko.zst) zstd -qdc "$MODDIR/$path" > "$INITRD/lib/modules/${base%.zst}"; base=${base%.zst} ;;
        *) cp "$MODDIR/$path" "$INITRD/lib/modules/$base" ;;
    esac
    echo "$base" >> "$INITRD/modules"
done
cat > "$INITRD/init" <<'EOF'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules); do insmod /lib/modules/$m 2>/dev/null; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mount -t ext4 -o rw,noatime /dev/vda /newroot || { echo "initrd: cannot mount /dev/vda"; exec sh; }
umount /proc /sys
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
exec switch_root /newroot /sbin/init
EOF
chmod 0755 "$INITRD/init"
(cd "$INITRD" && find . | cpio -o -H newc --quiet | gzip -1) > "$CACHE/initrd.img"
rm -rf "$INITRD"

# --- disk image ---------------------------------------------------------------------
say "rootfs.img (mkfs.ext4 -d, ${IMAGE_MB} MiB sparse)"
rm -f "$CACHE/rootfs.img.tmp"
mkfs.ext4 -q -F -L edged-root -d "$ROOTFS" "$CACHE/rootfs.img.tmp" "${IMAGE_MB}M"
mv "$CACHE/rootfs.img.tmp" "$CACHE/rootfs.img"
echo "$KVER" > "$CACHE/kernel-version"
rm -rf "$ROOTFS"
stamp_now > "$CACHE/stamp"
say "built in $(( $(date +%s) - T0 )) s: $CACHE"
