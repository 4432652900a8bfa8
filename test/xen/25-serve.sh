# The resident service under real xl: `xen-blockhooks serve` runs in dom0, and two PV domUs on
# block-cow disks over one base are created (each reads the base, writes its marker and reads it
# back), a block-cow disk is attached to and detached from a running domU, and both domains are
# destroyed. The hotplug log must show every add and remove done by the service's pid. Then the
# service is stopped (SIGTERM) and the same runs again through the wrappers alone. Nothing may be
# left after either round, and the base never changes.
. "$XBH_PROJECT/test/xen/lib.sh"

require_hooks
if ! hook_installed cow; then
	not_ok "block-cow is installed" "$(ls -l /etc/xen/scripts/ 2>&1)"
	finish
fi
BASE=/var/lib/xen/images/xbh-serve.img
mkdir -p /var/lib/xen/images
make_base $BASE 32
sum0=$(sha256sum <$BASE)
LOG=/var/log/xen/xen-hotplug.log
CHAN=/run/xen-blockhooks/serve

# served_lines PID WHAT: lines of the hotplug log that block-cow[PID] wrote with WHAT in them.
served_lines() { grep -c "block-cow\[$1\] info $2" $LOG 2>/dev/null || true; }

round() { # round LABEL SPID (SPID empty: the service is stopped)
	label=$1 spid=$2
	for g in 1 2; do
		cfg=$(domu_cfg xbhsrv$g marker "xbh_marker=srv$g xbh_hold=1" "format=raw, vdev=xvda, access=rw, script=block-cow, target=$BASE 32")
		xl_create "$label: xl create xbhsrv$g (block-cow)" "$cfg" || {
			expect_nothing_left "$label: after the failed create"
			return 1
		}
	done
	for g in 1 2; do
		expect_connected "$label: block-cow xbhsrv$g" "$(vbd_backend "$(domid xbhsrv$g)" 51712)"
		if wait_console xbhsrv$g "xbh-domu: holding" 90 && console_has xbhsrv$g "base=BASE-IMAGE-DATA" && console_has xbhsrv$g "readback=XBH:srv$g"; then
			ok "$label: xbhsrv$g reads the base through its CoW disk and reads back its own marker"
		else
			not_ok "$label: xbhsrv$g reads the base and its own marker" "$(console_log xbhsrv$g | grep xbh-domu)"
		fi
	done
	for g in 1 2; do check "$label: xl destroy xbhsrv$g" xl destroy xbhsrv$g; done
	expect_nothing_left "$label: after xl destroy of both"
	start_watcher xbhsrvw 1 || return 1
	attach_detach xbhsrvw cow "format=raw, vdev=xvdb, access=rw, script=block-cow, target=$BASE 16" 1
	stop_watcher xbhsrvw 1
}

t=$(ms)
xen-blockhooks serve --no-watch >$XBH_SCRATCH/serve.out 2>&1 &
spid=$!
if until_true 30 sh -c "[ \"\$(cat $CHAN/pid 2>/dev/null)\" = $spid ]"; then
	ok "xen-blockhooks serve is up ($(($(ms) - t)) ms), pid $spid"
else
	not_ok "xen-blockhooks serve is up" "$(cat $XBH_SCRATCH/serve.out)"
	finish
fi
check "the channel is root's and 0700" sh -c "[ \"\$(stat -c '%U %a' $CHAN)\" = 'root 700' ]"
adds0=$(served_lines $spid "add .*: connected")
removes0=$(served_lines $spid "remove .*: done")
round "service up" $spid
adds=$(($(served_lines $spid "add .*: connected") - adds0))
removes=$(($(served_lines $spid "remove .*: done") - removes0))
if [ "$adds" = 3 ] && [ "$removes" = 3 ]; then
	ok "the service (pid $spid) ran all 3 adds and all 3 removes"
else
	not_ok "the service (pid $spid) ran all 3 adds and all 3 removes" "adds $adds, removes $removes" "$(grep block-cow $LOG | tail -20)"
fi

kill -TERM $spid
if wait $spid; then ok "SIGTERM stops the service, exit 0"; else not_ok "SIGTERM stops the service, exit 0" "exit $?: $(cat $XBH_SCRATCH/serve.out)"; fi
check "its pid file is gone" sh -c "[ ! -e $CHAN/pid ]"
from=$(($(wc -l <$LOG) + 1))
round "service stopped" ""
# The lines the stopped round wrote: its 3 adds and 3 removes, each add by a hook process of its own.
tail -n +$from $LOG >$XBH_SCRATCH/round2.log
adds2=$(grep -c "block-cow\[[0-9]*\] info add .*: connected" $XBH_SCRATCH/round2.log)
removes2=$(grep -c "block-cow\[[0-9]*\] info remove .*: done" $XBH_SCRATCH/round2.log)
pids2=$(grep -o "block-cow\[[0-9]*\] info add .*: connected" $XBH_SCRATCH/round2.log | grep -o '^block-cow\[[0-9]*\]' | sort -u | grep -c .)
if [ "$adds2" = 3 ] && [ "$removes2" = 3 ] && [ "$pids2" = 3 ]; then
	ok "with the service stopped, the wrappers ran the events themselves (3 adds by 3 processes, 3 removes)"
else
	not_ok "with the service stopped, the wrappers ran the events themselves" "adds $adds2 by $pids2 processes, removes $removes2" "$(grep 'block-cow' $XBH_SCRATCH/round2.log | grep -v debug | tail -12)"
fi
if [ "$(sha256sum <$BASE)" = "$sum0" ]; then ok "the base image is unchanged (sha256)"; else not_ok "the base image is unchanged"; fi
rm -f $BASE
finish
