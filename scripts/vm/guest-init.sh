#!/bin/sh
# PID 1 of the test guest (busybox). Loads the modules, stacks a tmpfs overlay on the host's
# root (9p, read-only), prepares /dev, /run, /scratch and the results share, then runs the
# guest agent (node, from the share) inside that root and powers off.
export PATH=/bin

die() {
	echo "guest-init: $*" >/dev/console
	poweroff -f
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

for m in $(cat /lib/modules/order); do
	insmod "/lib/modules/$m.ko" || die "insmod $m failed"
done

mkdir -p /mnt/lower /mnt/rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro,cache=loose hostroot /mnt/lower ||
	die "cannot mount the host root (9p tag hostroot)"
mount -t tmpfs -o mode=0755 rw /mnt/rw
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work overlay /newroot ||
	die "cannot mount the overlay root"

R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 shm $R/dev/shm
ln -sfn /proc/self/fd $R/dev/fd
ln -sfn /proc/self/fd/0 $R/dev/stdin
ln -sfn /proc/self/fd/1 $R/dev/stdout
ln -sfn /proc/self/fd/2 $R/dev/stderr

mount -t tmpfs -o mode=0755 run $R/run
mkdir -p $R/run/lock && chmod 1777 $R/run/lock
# Debian: /var/run and /var/lock point into /run.
for l in run lock; do
	t=/run
	[ $l = lock ] && t=/run/lock
	if [ ! -L $R/var/$l ]; then
		rm -rf $R/var/$l
		ln -s $t $R/var/$l
	fi
done
mkdir -p $R/scratch
mount -t tmpfs -o size=1g,mode=1777 scratch $R/scratch
mkdir -p $R/xbh-share
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 shared $R/xbh-share ||
	die "cannot mount the results share (9p tag shared)"

hostname guest
# The host writes the path of its own node binary (visible here at the same path).
chroot $R /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
	"$(cat $R/xbh-share/node)" /xbh-share/agent.mjs
echo "guest-init: agent exited with status $?" >/dev/console
sync
poweroff -f
