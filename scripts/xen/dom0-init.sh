#!/bin/sh
# PID 1 of dom0's initramfs (busybox). Loads the virtio/9p/overlay modules, stacks three
# read-only 9p exports — the Xen/node layer over the kernel modules over this machine's root —
# under a tmpfs upper as the new root, mounts the writable results share at /xbh-share and
# switches into it to run /xbh-share/stage2.sh (the dom0 setup and the scenarios).
export PATH=/bin

die() {
	echo "xbh-dom0-init: $*"
	echo "XBH-XEN-TIER-FAILED"
	sync
	poweroff -f
	sleep 1000
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec >/dev/console 2>&1

for m in $(cat /lib/modules/order); do
	insmod "/lib/modules/$m.ko" || die "insmod $m failed"
done

O=trans=virtio,version=9p2000.L,msize=512000,ro,cache=loose
mkdir -p /mnt/host /mnt/xenroot /mnt/modroot /mnt/rw
mount -t 9p -o $O hostroot /mnt/host || die "cannot mount the host root (9p tag hostroot)"
mount -t 9p -o $O xenroot /mnt/xenroot || die "cannot mount the Xen layer (9p tag xenroot)"
mount -t 9p -o $O modroot /mnt/modroot || die "cannot mount the module layer (9p tag modroot)"
mount -t tmpfs -o mode=0755 rw /mnt/rw
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay -o lowerdir=/mnt/xenroot:/mnt/modroot:/mnt/host,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work overlay /newroot ||
	die "cannot mount the overlay root"

R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/xbh-share
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 shared $R/xbh-share ||
	die "cannot mount the results share (9p tag shared)"
[ -f $R/xbh-share/stage2.sh ] || die "the results share has no stage2.sh"
exec switch_root $R /bin/sh /xbh-share/stage2.sh
die "switch_root failed"
