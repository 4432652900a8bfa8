#!/bin/sh
# PID 1 of the test domU (busybox, PV, console on hvc0). What it does comes from the kernel
# command line (xl's extra="..."; key=value words reach init's environment):
#   xbh_mode=marker xbh_marker=WORD  wait for /dev/xvda, print the 16 bytes at 4096 (what the
#                                    base holds), write "XBH:WORD" at 0 with fsync, read it
#                                    back, print it, power off
#   xbh_regrub=WORD                  (marker mode, a disk holding an ext2/ext4 filesystem with
#                                    /boot/grub/grub.cfg: a pygrub guest) then mount it, change
#                                    the grub.cfg's xbh_marker= to WORD, unmount: the next boot's
#                                    bootloader reads it from this disk ("regrub xbh_marker=WORD")
#   xbh_hold=1                       after "done", stay up (dom0 inspects, then xl destroy)
#   xbh_linger=S                     after "done", wait S seconds before powering off
#   xbh_mode=reread xbh_marker=WORD  wait for /dev/xvda, write "XBH:WORD" at 0 and "XBH2:WORD" at
#                                    1 MiB (another chunk) with fsync, then every second drop the
#                                    page cache and re-read both with O_DIRECT from the disk itself:
#                                    "reread #N head=... far=..." (numbered on, across a save and
#                                    restore: the guest's memory keeps the count)
#   xbh_mode=resize xbh_marker=WORD  load ext4, mount /dev/xvda (an ext4 filesystem holding
#                                    base.txt) read-write at /mnt, write guest.txt ("XBH:WORD"),
#                                    print "before sectors=N fs_kb=K avail_kb=A files ...", then
#                                    read the disk (O_DIRECT; not with xbh_idle=1) every half
#                                    second until its size changes (at most xbh_wait seconds,
#                                    default 300): "grown
#                                    sectors=N", the kernel's capacity lines ("kernel: ..."),
#                                    `resize2fs /dev/xvda` on the mounted filesystem ("resize2fs:"
#                                    lines, "resize2fs exit=N"), "after sectors=N fs_kb=K ...",
#                                    then a file of A + 4 MiB ("filled ... exit=N": more than the
#                                    old filesystem had free), both files read back again,
#                                    unmount ("unmounted"), done
#   xbh_mode=watch xbh_cycles=N      print "ready", then report /dev/xvdb appearing (with the
#                                    16 bytes at 4096) and disappearing, numbered; power off
#                                    after the N-th disappearance (default 1)
# Every line it prints starts with "xbh-domu:" so dom0 can find them in the console log.
export PATH=/bin

say() { echo "xbh-domu: $*"; }
finish() {
	say "done"
	sync
	if [ "${xbh_hold:-}" = 1 ]; then
		say "holding"
		while :; do sleep 1000; done
	fi
	[ -n "${xbh_linger:-}" ] && sleep "$xbh_linger"
	poweroff -f
	sleep 1000
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec >/dev/hvc0 2>&1 </dev/null
say "booted mode=${xbh_mode:-none}"
for m in $(cat /lib/modules/order); do
	insmod "/lib/modules/$m.ko" || say "insmod $m failed"
done

load_fs() {
	for m in $(cat /lib/modules/fs.order); do
		insmod "/lib/modules/$m.ko" || say "insmod $m failed"
	done
}

# xbh_regrub: the next boot's command line, in the grub.cfg on the disk.
regrub() {
	load_fs
	mount -t ext2 /dev/xvda /mnt 2>/dev/null || mount -t ext4 /dev/xvda /mnt || { say "regrub: mount failed"; return; }
	sed -i "s/xbh_marker=[A-Za-z0-9_-]*/xbh_marker=$xbh_regrub/" /mnt/boot/grub/grub.cfg || say "regrub: sed failed"
	now=$(grep -o 'xbh_marker=[A-Za-z0-9_-]*' /mnt/boot/grub/grub.cfg)
	sync
	umount /mnt || say "regrub: umount failed"
	say "regrub $now"
}

wait_for() { # wait_for PATH SECONDS
	n=0
	while [ ! -e "$1" ]; do
		n=$((n + 1))
		[ $n -gt $(($2 * 10)) ] && return 1
		sleep 0.1
	done
}

# Printable bytes of DEV at byte OFFSET, 16 of them.
peek() {
	dd if="$1" bs=16 count=1 skip=$(($2 / 16)) 2>/dev/null | tr -c 'A-Za-z0-9:._-' '.'
}

case "${xbh_mode:-}" in
marker)
	wait_for /dev/xvda 30 || { say "no /dev/xvda"; finish; }
	say "xvda sectors=$(cat /sys/block/xvda/size)"
	say "xvda base=$(peek /dev/xvda 4096)"
	# conv=fsync: the write reaches the backend before dd exits (dom0 checks it there).
	printf 'XBH:%s\n' "$xbh_marker" | dd of=/dev/xvda bs=16 count=1 conv=sync,notrunc,fsync 2>/dev/null || say "write failed"
	say "xvda readback=$(peek /dev/xvda 0)"
	[ -n "${xbh_regrub:-}" ] && regrub
	finish
	;;
reread)
	wait_for /dev/xvda 30 || { say "no /dev/xvda"; finish; }
	say "xvda base=$(peek /dev/xvda 4096)"
	printf 'XBH:%s\n' "$xbh_marker" | dd of=/dev/xvda bs=16 count=1 conv=sync,notrunc,fsync 2>/dev/null || say "write failed"
	printf 'XBH2:%s\n' "$xbh_marker" | dd of=/dev/xvda bs=16 seek=65536 count=1 conv=sync,notrunc,fsync 2>/dev/null || say "write failed"
	say "wrote"
	n=0
	while :; do
		n=$((n + 1))
		echo 3 >/proc/sys/vm/drop_caches
		head=$(dd if=/dev/xvda iflag=direct bs=4096 count=1 2>/dev/null | head -c 16 | tr -c 'A-Za-z0-9:._-' '.')
		far=$(dd if=/dev/xvda iflag=direct bs=4096 skip=256 count=1 2>/dev/null | head -c 16 | tr -c 'A-Za-z0-9:._-' '.')
		say "reread #$n head=$head far=$far"
		sleep 1
	done
	;;
resize)
	load_fs
	wait_for /dev/xvda 30 || { say "no /dev/xvda"; finish; }
	mount -t ext4 /dev/xvda /mnt || { say "mount failed"; finish; }
	printf 'XBH:%s\n' "$xbh_marker" >/mnt/guest.txt && sync || say "write failed"
	# fs_kb and avail_kb: df's 1K-blocks and Available of the mounted filesystem.
	sizes() {
		set -- $(df -k /mnt | tail -n 1)
		echo "sectors=$(cat /sys/block/xvda/size) fs_kb=$2 avail_kb=$4"
	}
	files() { echo "base=$(cat /mnt/base.txt) guest=$(cat /mnt/guest.txt)"; }
	say "before $(sizes) files $(files)"
	avail=$(set -- $(df -k /mnt | tail -n 1) && echo "$4")
	s0=$(cat /sys/block/xvda/size)
	say "waiting${xbh_idle:+ idle=$xbh_idle}"
	n=0
	while [ "$(cat /sys/block/xvda/size)" = "$s0" ]; do
		n=$((n + 1))
		[ $n -gt $((${xbh_wait:-300} * 2)) ] && { say "the size never changed"; finish; }
		# A request wakes blkback's thread for the ring, which compares the device's size with
		# the one it announced; it also wakes every 100 ms on its own: xbh_idle=1 issues none.
		[ "${xbh_idle:-}" = 1 ] || dd if=/dev/xvda iflag=direct bs=4096 count=1 of=/dev/null 2>/dev/null
		sleep 0.5
	done
	say "grown sectors=$(cat /sys/block/xvda/size) (was $s0)"
	dmesg | grep -i -e capacity -e xvda | tail -n 4 | while read -r l; do say "kernel: $l"; done
	resize2fs /dev/xvda >/tmp/resize2fs.out 2>&1
	rc=$?
	while read -r l; do say "resize2fs: $l"; done </tmp/resize2fs.out
	say "resize2fs exit=$rc"
	say "after $(sizes) files $(files)"
	dd if=/dev/zero of=/mnt/fill bs=1024 count=$((avail + 4096)) conv=fsync 2>/dev/null
	rc=$?
	say "filled $((avail + 4096)) KiB (old avail_kb=$avail) exit=$rc $(sizes)"
	say "reread files $(files)"
	umount /mnt && say "unmounted"
	finish
	;;
watch)
	say "ready"
	n=0
	seen=
	cycle=0
	while [ $n -lt 3000 ]; do
		if [ -z "$seen" ] && [ -e /dev/xvdb ]; then
			seen=1
			cycle=$((cycle + 1))
			sleep 0.5
			say "xvdb appeared #$cycle sectors=$(cat /sys/block/xvdb/size 2>/dev/null) data=$(peek /dev/xvdb 4096)"
		elif [ -n "$seen" ] && [ ! -e /sys/block/xvdb ]; then
			seen=
			say "xvdb gone #$cycle"
			[ "$cycle" -ge "${xbh_cycles:-1}" ] && finish
		fi
		n=$((n + 1))
		sleep 0.1
	done
	say "watch timed out"
	finish
	;;
*)
	say "unknown mode"
	finish
	;;
esac
