# Helpers for the scenarios of the Xen tier (sourced by test/xen/NN-*.sh, which run inside
# dom0 with real xl, xenstored and blkback). A scenario prints TAP-style lines the host folds
# into assertions:
#   ok - WHAT            not ok - WHAT            ok - WHAT # SKIP WHY            # note
# and exits non-zero when anything failed (finish does that).
XBH_FAILED=0

ms() { echo $(($(date +%s%N) / 1000000)); }
XBH_LAST=$(ms)
# Milliseconds since the previous assertion, as a trailing note.
lap() {
	now=$(ms)
	echo "# ($((now - XBH_LAST)) ms)"
	XBH_LAST=$now
}

# Progress also goes to dom0's console (XBH_ECHO), where the serial log shows it live.
echo_console() { [ -n "${XBH_ECHO:-}" ] && echo "xbh-$XBH_SCENARIO_ID: $*" >"$XBH_ECHO"; return 0; }

ok() { echo "ok - $*"; echo_console "ok - $*"; lap; }
not_ok() {
	echo "not ok - $1"
	echo_console "not ok - $1"
	lap
	shift
	for l in "$@"; do printf '%s\n' "$l" | sed 's/^/#   /'; done
	XBH_FAILED=1
}
skip() { echo "ok - $1 # SKIP $2"; echo_console "skip - $1"; lap; }
note() { printf '%s\n' "$*" | sed 's/^/# /'; echo_console "# $*"; }
finish() { exit $XBH_FAILED; }

# check WHAT CMD ARG...: runs CMD; ok when it exits 0, else not ok with its output.
check() {
	what=$1
	shift
	if out=$("$@" 2>&1); then ok "$what"; else not_ok "$what" "\$ $*" "$out"; fi
}

# until_true SECONDS CMD ARG...: retries CMD every 0.2 s until it succeeds or time runs out.
until_true() {
	limit=$(($(ms) + $1 * 1000))
	shift
	while ! "$@" >/dev/null 2>&1; do
		[ "$(ms)" -gt "$limit" ] && return 1
		sleep 0.2
	done
}

domid() { xl domid "$1" 2>/dev/null; }

# Backend node of a domain's disk by vdev number (xvda = 51712, xvdb = 51728).
vbd_backend() { echo "/local/domain/0/backend/vbd/$1/$2"; }

backend_state() { xenstore-read "$1/state" 2>/dev/null; }
backend_connected() { [ "$(backend_state "$1")" = 4 ]; }

# expect_connected WHAT BACKEND: the backend reached state 4 (Connected) and has physical-device.
expect_connected() {
	if until_true 60 backend_connected "$2"; then
		ok "$1: backend $2 is Connected (state 4), physical-device $(xenstore-read "$2/physical-device" 2>/dev/null)"
	else
		not_ok "$1: backend $2 is Connected (state 4)" "state=$(backend_state "$2") hotplug-status=$(xenstore-read "$2/hotplug-status" 2>&1)" \
			"physical-device=$(xenstore-read "$2/physical-device" 2>&1)" "$(xenstore-ls -f "$2" 2>&1 | head -30)"
	fi
}

# A domU's console log (xenconsoled --log=guest).
console_log() { cat "$XBH_CONSOLE_LOGS/guest-$1.log" 2>/dev/null; }
console_has() { console_log "$1" | grep -q -- "$2"; }

# wait_console NAME PATTERN SECONDS
wait_console() { until_true "$3" console_has "$1" "$2"; }

# Writes a PV domU config: domu_cfg NAME MODE EXTRA DISK... → prints the config path.
domu_cfg() {
	name=$1 mode=$2 extra=$3
	shift 3
	cfg=$XBH_SCRATCH/$name.cfg
	{
		echo "name = \"$name\""
		echo 'type = "pv"'
		echo "kernel = \"$XBH_DOMU_KERNEL\""
		echo "ramdisk = \"$XBH_DOMU_RAMDISK\""
		echo "extra = \"console=hvc0 quiet xbh_mode=$mode $extra\""
		echo 'memory = 256'
		echo 'vcpus = 1'
		echo 'on_poweroff = "destroy"'
		echo 'on_crash = "destroy"'
		printf 'disk = ['
		sep=
		for d in "$@"; do
			printf '%s"%s"' "$sep" "$d"
			sep=', '
		done
		echo ']'
	} >"$cfg"
	echo "$cfg"
}

domain_gone() { ! xl domid "$1" >/dev/null 2>&1; }

# A raw image of SIZE MiB with "BASE-IMAGE-DATA!" at byte 4096 (what the guests read as "base").
make_base() {
	dd if=/dev/zero of="$1" bs=1M count="$2" status=none
	printf 'BASE-IMAGE-DATA!' | dd of="$1" bs=4096 seek=1 conv=notrunc status=none
}

# hook_installed TYPE: /etc/xen/scripts/block-TYPE is installed; hook_installed "": our block.
hook_installed() { [ -x "/etc/xen/scripts/block${1:+-$1}" ] && grep -q 'xen-blockhooks' "/etc/xen/scripts/block${1:+-$1}"; }

# record_layer_package DEB: dom0's dpkg database is the build machine's, and may not list a
# package whose files the xenroot layer unpacked into dom0 (xen-utils-common, Debian's nodejs):
# record it as installed, with the control fields of the .deb that was unpacked.
record_layer_package() {
	p=$(dpkg-deb -f "$1" Package) || return 1
	if dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q ' installed$'; then return 0; fi
	{ dpkg-deb -f "$1" | awk 'NR == 1 { print; print "Status: install ok installed"; next } { print }'; echo; } >>/var/lib/dpkg/status
	echo "recorded $p $(dpkg-deb -f "$1" Version) as installed (unpacked by the xenroot layer)"
}

# Installs the project's hooks into dom0's /etc/xen/scripts (dom0's root is a tmpfs overlay, so
# this touches nothing on the host): with the Debian package and dpkg -i when the run built one
# (then xen-blockhooks-replace-block for the drop-in block), else with the project's installer,
# else by linking each bundle. Prints how it installed; returns 1 when there is nothing to install.
install_hooks() {
	deb=
	if [ -n "$XBH_INSTALL" ]; then
		for f in "$(dirname "$XBH_INSTALL")"/xen-blockhooks_*_all.deb; do [ -f "$f" ] && deb=$f; done
	fi
	if [ -n "$deb" ] && command -v dpkg >/dev/null 2>&1; then
		(
			set -e
			for l in "$(dirname "$XBH_INSTALL")"/layer-debs/*.deb; do
				if [ -f "$l" ]; then record_layer_package "$l"; fi
			done
			# --no-triggers: the build machine's man-db would rebuild its index (minutes here);
			# xen-blockhooks' own steps run at configure.
			dpkg -i --no-triggers "$deb"
			xen-blockhooks-replace-block
		) >"$XBH_SCRATCH/install.log" 2>&1 || { cat "$XBH_SCRATCH/install.log"; return 1; }
		echo "installed with dpkg -i $(basename "$deb"), then xen-blockhooks-replace-block"
		return 0
	fi
	if [ -n "$XBH_INSTALL" ] && [ -x "$XBH_INSTALL" ]; then
		"$XBH_INSTALL" --replace-block >"$XBH_SCRATCH/install.log" 2>&1 || { cat "$XBH_SCRATCH/install.log"; return 1; }
		echo "installed with the project's installer: install --replace-block"
		return 0
	fi
	found=
	for b in "$XBH_DIST"/block*.mjs; do
		[ -f "$b" ] || continue
		found=1
		n=$(basename "$b" .mjs)
		printf '#!/bin/sh\n# xen-blockhooks: linked by the Xen tier\nexec node %s "$@"\n' "$b" >/etc/xen/scripts/$n
		chmod 755 /etc/xen/scripts/$n
	done
	[ -n "$found" ] || return 1
	echo "installed by linking $XBH_DIST/block*.mjs"
}

# ensure_hooks: install_hooks unless block-cow is installed already (dom0's root lives as long
# as the boot, so the first scenario that needs the hooks installs them for the rest).
ensure_hooks() {
	if [ -f /run/xbh-hooks-installed ]; then
		cat /run/xbh-hooks-installed
		return 0
	fi
	how=$(install_hooks) || return 1
	echo "$how" >/run/xbh-hooks-installed
	echo "$how"
}

# require_hooks: ensure_hooks, or a failed assertion with the installer's log and the end of the
# scenario (a failed install fails, never skips).
require_hooks() {
	if ! how=$(ensure_hooks); then
		not_ok "install the hooks" "$(cat "$XBH_SCRATCH/install.log" 2>/dev/null)"
		finish
	fi
	note "$how"
}

# require_package: require_hooks, and the hooks must have come from the Debian package (dpkg -i),
# or a failed assertion ends the scenario. Sets PKG_DIR (where the run's packages are), LIB (the
# package's library directory) and HOOKS (every hook it installs).
require_package() {
	require_hooks
	case $(cat /run/xbh-hooks-installed 2>/dev/null) in
	"installed with dpkg -i"*) ;;
	*)
		not_ok "the hooks are installed from the Debian package" "$(cat /run/xbh-hooks-installed 2>/dev/null)"
		finish
		;;
	esac
	PKG_DIR=$(dirname "$XBH_INSTALL")
	LIB=/usr/lib/xen-blockhooks
	HOOKS="block-cow block-qcow block-thin block-lvsnap block-rbd block"
}

# A scenario that builds storage of its own for a hook to use (a volume group on a loop, the loop
# under a Ceph OSD) names it here while it exists: exact dm device names and loop devices that
# nothing_left does not count. Empty by default, and set back to empty before the scenario's
# last check, so every scenario still ends with nothing at all.
XBH_OWN_DM=
XBH_OWN_LOOPS=

# The dm devices and loops not in XBH_OWN_DM / XBH_OWN_LOOPS, one a line.
foreign_dm() {
	dmsetup ls 2>/dev/null | grep -v '^No devices found' | while read -r n _; do
		case " $XBH_OWN_DM " in *" $n "*) ;; *) echo "$n" ;; esac
	done
}
foreign_loops() {
	losetup -a 2>/dev/null | while IFS=: read -r d _; do
		case " $XBH_OWN_LOOPS " in *" $d "*) ;; *) echo "$d" ;; esac
	done
}

# Lock files left, one a line: ours in /run/xen-blockhooks/locks (src/lock/paths.ts) and Xen's
# in /run/xen-hotplug (its `block` lock, which our hooks take too). Every holder unlinks its file
# when it lets go (src/lock/flock.ts, Xen's locking.sh); the one kept by design is `watch`, the
# lock of a running `xen-blockhooks watch`. A file a SIGKILLed holder left (libxl's 40 s limit)
# does not block anyone, but it is counted: no hook is meant to be killed in a scenario.
leftover_locks() {
	for f in /run/xen-blockhooks/locks/* /run/xen-hotplug/*; do
		[ -e "$f" ] || continue
		case $f in /run/xen-blockhooks/locks/watch) ;; *) echo "$f" ;; esac
	done
}

nothing_left() {
	[ -z "$(foreign_dm)" ] && [ -z "$(foreign_loops)" ] &&
		[ -z "$(find /var/lib/xen-blockhooks -type f 2>/dev/null)" ] &&
		[ -z "$(leftover_locks)" ] &&
		node "$XBH_DIST/xen-blockhooks.mjs" status --json 2>/dev/null | grep -q '"devices": \[\]'
}

# expect_nothing_left WHEN: no dm device, loop, store file, lock file or recorded device (the
# hooks' own `xen-blockhooks status`) — waiting a little for xl's asynchronous remove. Only the
# scenario's own XBH_OWN_DM / XBH_OWN_LOOPS are not counted (and the assertion names them).
expect_nothing_left() {
	own=
	[ -n "$XBH_OWN_DM$XBH_OWN_LOOPS" ] && own=" (not counting the scenario's own: $(echo $XBH_OWN_DM $XBH_OWN_LOOPS))"
	if until_true 20 nothing_left; then
		ok "$1: no dm device, loop, store file, lock file or recorded device is left$own"
	else
		not_ok "$1: no dm device, loop, store file, lock file or recorded device is left$own" "dmsetup ls: $(dmsetup ls 2>&1)" \
			"losetup -a: $(losetup -a 2>&1)" "stores: $(find /var/lib/xen-blockhooks -type f 2>&1)" \
			"lock files: $(leftover_locks)" "status: $(node "$XBH_DIST/xen-blockhooks.mjs" status 2>&1)"
	fi
}

# attach_detach DOMAIN HOOK SPEC N: one cycle of a domU in watch mode (xbh_mode=watch): `xl
# block-attach DOMAIN SPEC` (xvdb) returns 0, the backend reaches Connected, the guest reports
# xvdb appearing for the N-th time with the base's data at 4096; `xl block-detach` returns 0, the
# guest reports it gone, the backend node goes, and nothing is left (expect_nothing_left).
# The attach and detach times are in the assertions. A hook-specific check of the attached disk
# can run between the two: the function named by XBH_WHILE_ATTACHED, if set, with HOOK.
# Returns 1 when the attach failed.
attach_detach() {
	dom=$1 hook=$2 spec=$3 n=$4
	be=$(vbd_backend "$(domid "$dom")" 51728)
	t=$(ms)
	if out=$(xl block-attach "$dom" "$spec" 2>&1); then
		ok "$hook: xl block-attach returned 0 ($(($(ms) - t)) ms)"
	else
		not_ok "$hook: xl block-attach" "$out"
		expect_nothing_left "$hook: after the failed attach"
		return 1
	fi
	expect_connected "$hook attach" "$be"
	if wait_console "$dom" "xvdb appeared #$n .*data=BASE-IMAGE-DATA" 60; then
		ok "$hook: the guest saw xvdb appear with the base's data"
	else
		not_ok "$hook: the guest saw xvdb appear with the base's data" "$(console_log "$dom" | grep xbh-domu)"
	fi
	[ -n "${XBH_WHILE_ATTACHED:-}" ] && "$XBH_WHILE_ATTACHED" "$hook"
	t=$(ms)
	if out=$(xl block-detach "$dom" xvdb 2>&1); then
		ok "$hook: xl block-detach returned 0 ($(($(ms) - t)) ms)"
	else
		not_ok "$hook: xl block-detach" "$out"
	fi
	if wait_console "$dom" "xvdb gone #$n" 60; then ok "$hook: the guest saw xvdb disappear"; else not_ok "$hook: the guest saw xvdb disappear" "$(console_log "$dom" | grep xbh-domu)"; fi
	if until_true 20 sh -c "! xenstore-exists $be"; then ok "$hook: the backend node is gone"; else not_ok "$hook: the backend node is gone" "$(xenstore-ls -f "$be")"; fi
	expect_nothing_left "$hook: after block-detach"
	return 0
}

# start_watcher NAME CYCLES: xl create a disk-less domU in watch mode and wait until it is up.
# Returns 1 (asserted) when it did not start.
start_watcher() {
	xl_create "xl create $1 (no disks)" "$(domu_cfg "$1" watch "xbh_cycles=$2")" || return 1
	if wait_console "$1" "xbh-domu: ready" 90; then
		ok "$1 is up"
	else
		not_ok "$1 is up" "$(console_log "$1" | tail -20)"
		xl destroy "$1" 2>/dev/null
		return 1
	fi
}

# stop_watcher NAME CYCLES: the domU powers itself off after its cycles (destroyed if not).
stop_watcher() {
	if until_true 30 domain_gone "$1"; then
		ok "$1 powered off after $2 cycles"
	else
		not_ok "$1 powered off" "$(console_log "$1" | tail)"
		xl destroy "$1"
	fi
}

# xl_create WHAT CFG: xl create, asserted; on failure explains libxl's fixed 40 s hotplug limit
# when that is what killed the hook (under TCG on a loaded machine a cold node start alone can
# take that long). Returns xl's status.
xl_create() {
	if out=$(xl create "$2" 2>&1); then
		ok "$1"
		return 0
	fi
	if printf '%s\n' "$out" | grep -q 'because of timeout'; then
		not_ok "$1" "$out" "libxl killed the hook at its fixed 40 s hotplug limit; dom0 load: $(cat /proc/loadavg)," \
			"host load is in the run summary (a cold node start here took $(cat /run/xbh-node-ms 2>/dev/null || echo '?') ms)"
	else
		not_ok "$1" "$out"
	fi
	return 1
}

# --- a rereading guest through save and restore (scenarios 80 and 82) ----------------------------
CLI="node $XBH_DIST/xen-blockhooks.mjs"
SAVED=/var/lib/xen-blockhooks/saved

# last_reread NAME: the number of the guest's last "reread #N" line (0 if none).
last_reread() { console_log "$1" | sed -n 's/.*xbh-domu: reread #\([0-9]*\) .*/\1/p' | tail -n 1 | grep . || echo 0; }
# rereads_after NAME N: the reread lines numbered above N.
rereads_after() { console_log "$1" | grep 'xbh-domu: reread #' | awk -v n="$2" '{ split($3, a, "#"); if (a[2] + 0 > n) print }'; }
reread_past() { [ "$(last_reread "$1")" -gt "$2" ]; }

# start NAME MARKER SPEC-TAIL [HOOK TARGET]: xl create a rereading domU (domu-init's reread mode)
# on a disk of HOOK (default block-cow over $REREAD_BASE); waits for 3 rereads.
start() {
	hook=${4:-cow}
	cfg=$(domu_cfg "$1" reread "xbh_marker=$2" "format=raw, vdev=xvda, access=rw, script=block-$hook, target=${5:-$REREAD_BASE} $3")
	xl_create "xl create $1 (block-$hook, $3)" "$cfg" || return 1
	if until_true 90 reread_past "$1" 2; then ok "$1 wrote its pattern and re-reads it"; else not_ok "$1 re-reads its pattern" "$(console_log "$1" | tail -20)"; return 1; fi
	if rereads_after "$1" 0 | grep -v -q "head=XBH:$2.* far=XBH2:$2"; then
		not_ok "$1 reads back its own pattern before the save" "$(rereads_after "$1" 0)"
	else
		ok "$1 reads back its own pattern before the save"
	fi
}

# save NAME: xl save into the scratch folder (a tmpfs: one save file at a time), asserted; the
# domain is gone afterwards. A failed save leaves the domain running: it is destroyed, returns 1.
save() {
	t=$(ms)
	rm -f "$XBH_SCRATCH"/*.save
	if out=$(xl save "$1" "$XBH_SCRATCH/$1.save" 2>&1); then
		ok "xl save $1 ($(($(ms) - t)) ms)"
	else
		not_ok "xl save $1" "$out"
		xl destroy "$1" 2>/dev/null
		return 1
	fi
	until_true 30 domain_gone "$1" || not_ok "$1 is gone after the save" "$(xl list 2>&1)"
}

# restore NAME: xl restore -p (the domain stays paused until xl unpause).
restore() {
	t=$(ms)
	out=$(xl restore -p "$XBH_SCRATCH/$1.save" 2>&1)
	rc=$?
	note "xl restore -p $1: exit $rc ($(($(ms) - t)) ms)"
	printf '%s\n' "$out" | tail -5 | sed 's/^/  /' | while read -r l; do note "$l"; done
	RESTORE_OUT=$out
	return $rc
}

# keeps_pattern NAME MARKER BEFORE [WHEN]: after WHEN (default: the restore) the guest's rereads go
# on past BEFORE, and every one of them still finds its pattern on the disk.
keeps_pattern() {
	when=${4:-the restore}
	if until_true 90 reread_past "$1" $(($3 + 3)); then ok "$1 runs on after $when"; else not_ok "$1 runs on after $when" "$(console_log "$1" | tail -20)"; return; fi
	after=$(rereads_after "$1" "$3")
	if printf '%s\n' "$after" | grep -v -q "head=XBH:$2.* far=XBH2:$2"; then
		not_ok "$1 reads exactly what it wrote after $when" "$after"
	else
		ok "$1 reads exactly what it wrote after $when ($(printf '%s\n' "$after" | wc -l) rereads)"
	fi
}


# save_restore_keeps NAME MARKER HOOK TARGET SPEC-TAIL: a rereading guest on a HOOK disk (target=
# TARGET SPEC-TAIL) through xl save + xl restore in one boot: the restored domain gets the device
# it was saved with, reads exactly what it wrote, and xl destroy leaves nothing (beyond the
# scenario's own XBH_OWN_*). Returns 1 when the guest did not start or the save failed.
save_restore_keeps() {
	start "$1" "$2" "$5" "$3" "$4" || return 1
	be=$(vbd_backend "$(domid "$1")" 51712)
	pd=$(xenstore-read "$be/physical-device")
	save "$1" || return 1
	before=$(last_reread "$1")
	if restore "$1"; then ok "xl restore $1"; else not_ok "xl restore $1" "$RESTORE_OUT"; fi
	be=$(vbd_backend "$(domid "$1")" 51712)
	if [ "$(xenstore-read "$be/physical-device" 2>&1)" = "$pd" ]; then ok "block-$3: the restored domain got the device it was saved with ($pd)"; else not_ok "block-$3: the restored domain got the device it was saved with" "before: $pd" "now: $(xenstore-read "$be/physical-device" 2>&1)"; fi
	xl unpause "$1"
	keeps_pattern "$1" "$2" "$before"
	check "xl destroy $1" xl destroy "$1"
	expect_nothing_left "block-$3: after destroying the restored domain"
	rm -f "$XBH_SCRATCH"/*.save
}
