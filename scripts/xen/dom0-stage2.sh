#!/bin/sh
# dom0's PID 1 after switch_root (copied into the results share as stage2.sh and run with this
# machine's /bin/sh). Prepares dom0 as a Debian dom0 would have it — /run, /dev/pts, the Xen
# modules, xenfs, xenstored, xen-init-dom0, xenconsoled — then runs each scenario of the plan
# with a clean environment and a time limit, writes its output, exit status and duration to the
# share, collects the logs, prints the end marker the host watches for and powers off.
S=/xbh-share
. $S/plan.env
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
XENBIN=/usr/lib/xen-4.17/bin
exec >/dev/console 2>&1 </dev/null

ms() { echo $(($(date +%s%N) / 1000000)); }
T0=$(ms)
say() { echo "xbh-dom0: [$(($(ms) - T0)) ms] $*"; }
end() {
	mkdir -p $S/logs
	cp -r /var/log/xen/. $S/logs/ 2>/dev/null
	dmesg >$S/logs/dom0-dmesg.txt 2>&1
	sync
	echo "XBH-XEN-TIER-$1"
	sync
	poweroff -f
	sleep 1000
}
fail() {
	say "setup failed: $*"
	echo "$*" >$S/setup-error
	end FAILED
}

mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=0666 devpts /dev/pts || fail "mount devpts"
mount -t tmpfs -o mode=1777 shm /dev/shm
ln -sfn /proc/self/fd /dev/fd
ln -sfn /proc/self/fd/0 /dev/stdin
ln -sfn /proc/self/fd/1 /dev/stdout
ln -sfn /proc/self/fd/2 /dev/stderr
mount -t tmpfs -o mode=0755 run /run
mkdir -p /run/xen /run/xenstored /run/xen-hotplug /run/lock && chmod 1777 /run/lock
for l in run lock; do
	t=/run
	[ $l = lock ] && t=/run/lock
	if [ ! -L /var/$l ]; then
		rm -rf /var/$l
		ln -s $t /var/$l
	fi
done
mkdir -p /scratch && mount -t tmpfs -o size=512m,mode=1777 scratch /scratch
mkdir -p /var/log/xen/console /var/lib/xen /var/lib/xenstored /tmp && chmod 1777 /tmp
hostname dom0

# The Xen, loop, nbd and device-mapper modules were loaded by the initramfs.
mount -t xenfs xenfs /proc/xen || fail "mount xenfs"

say "xenstored"
$XENBIN/xenstored --pid-file /run/xen/xenstored.pid >$S/xenstored.out 2>&1 || fail "xenstored did not start"
n=0
until xenstore-read / >/dev/null 2>&1; do
	n=$((n + 1))
	[ $n -gt 300 ] && fail "xenstored does not answer"
	sleep 0.1
done
say "xen-init-dom0"
$XENBIN/xen-init-dom0 >$S/xen-init-dom0.out 2>&1 || fail "xen-init-dom0 failed: $(cat $S/xen-init-dom0.out)"
say "xenconsoled"
$XENBIN/xenconsoled --pid-file=/run/xen/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console ||
	fail "xenconsoled did not start"
echo "$(($(ms) - T0))" >$S/ready-ms
say "ready"

# What a scenario left behind (domains, rbd mappings, Ceph daemons, dm devices, loops, nbd, lock
# files): printed, then cleared so the next scenario starts clean. Lock files: ours in
# /run/xen-blockhooks/locks and Xen's in /run/xen-hotplug; every holder unlinks its own on
# release, and only `watch` (a running xen-blockhooks watch) stays by design (src/lock/paths.ts).
leftovers() {
	doms=$(xl list 2>/dev/null | awk 'NR > 1 && $1 != "Domain-0" { print $1 }')
	rbds=$(ls /sys/bus/rbd/devices 2>/dev/null)
	cephs=$(pidof ceph-osd ceph-mon)
	dm=$(dmsetup ls 2>/dev/null | grep -v '^No devices found')
	loops=$(losetup -a 2>/dev/null)
	nbds=$(for p in /sys/block/nbd*/pid; do [ -e "$p" ] && echo "${p%/pid}"; done)
	locks=$(for f in /run/xen-blockhooks/locks/* /run/xen-hotplug/*; do
		[ -e "$f" ] && [ "$f" != /run/xen-blockhooks/locks/watch ] && echo "$f"
	done)
	[ -n "$doms" ] && echo "domains: $doms"
	[ -n "$rbds" ] && echo "rbd mappings: $rbds"
	[ -n "$cephs" ] && echo "Ceph daemons: $cephs"
	[ -n "$dm" ] && printf 'dmsetup ls:\n%s\n' "$dm"
	[ -n "$loops" ] && printf 'losetup -a:\n%s\n' "$loops"
	[ -n "$nbds" ] && echo "connected nbd: $nbds"
	[ -n "$locks" ] && printf 'lock files:\n%s\n' "$locks"
	for d in $doms; do xl destroy "$d" >/dev/null 2>&1; done
	for r in $rbds; do echo "$r force" >/sys/bus/rbd/remove_single_major 2>/dev/null || echo "$r force" >/sys/bus/rbd/remove; done
	[ -n "$cephs" ] && kill -9 $cephs
	[ -n "$dm" ] && dmsetup remove_all -f >/dev/null 2>&1
	for n in $nbds; do qemu-nbd -d /dev/${n##*/} >/dev/null 2>&1; done
	[ -n "$loops" ] && losetup -D
	[ -n "$locks" ] && rm -f $locks
	rm -rf /scratch/* 2>/dev/null
	return 0
}

# Scenarios: one line of the plan each ("ID INTERPRETER FILE"), run from the project folder.
mkdir -p $S/results
while read -r id interp file; do
	[ -n "$id" ] || continue
	# A scenario that needs longer than the default says so in a line of its own: "# xbh-timeout: S".
	limit=$(sed -n 's/^# xbh-timeout: \([0-9][0-9]*\)$/\1/p' "$file" 2>/dev/null | head -n 1)
	say "scenario $id $file (time limit ${limit:-$XBH_SCENARIO_TIMEOUT} s)"
	t=$(ms)
	# The plan's extra variables (XBH_PASS names them; plain words, checked by run.mjs).
	extra=
	for v in ${XBH_PASS:-}; do eval "extra=\"\$extra $v=\${$v}\""; done
	(
		cd "$XBH_PROJECT" &&
			exec env -i PATH="$PATH" HOME=/root LANG=C.UTF-8 DM_DISABLE_UDEV=1 \
				XBH_PROJECT="$XBH_PROJECT" XBH_DIST="$XBH_DIST" XBH_DOMU_KERNEL="$XBH_DOMU_KERNEL" XBH_DOMU_RAMDISK="$XBH_DOMU_RAMDISK" \
				XBH_CONSOLE_LOGS=/var/log/xen/console XBH_SCRATCH=/scratch XBH_INSTALL="$XBH_INSTALL" \
				XBH_SCENARIO_ID="$id" XBH_ECHO=/dev/console $extra \
				timeout -k 5 "${limit:-$XBH_SCENARIO_TIMEOUT}" "$interp" "$file"
	) >$S/results/$id.out 2>$S/results/$id.err </dev/null
	rc=$?
	echo "$rc $(($(ms) - t))" >$S/results/$id.status
	say "scenario $id exit=$rc $(($(ms) - t)) ms"
	leftovers >$S/results/$id.leftovers 2>&1
	[ -s $S/results/$id.leftovers ] && say "scenario $id left things behind (cleared)"
done <$S/scenarios
say "all scenarios ran"
end DONE
