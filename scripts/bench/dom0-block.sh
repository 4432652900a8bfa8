# Benchmark part "dom0", run inside the Xen tier's PV dom0 (scripts/bench/dom0.mjs boots it with
# this file as its one scenario): add+remove of a file: disk by Debian's stock `block` and by ours,
# run directly the way libxl runs them (XENBUS_PATH relative, the backend nodes written first into
# the real xenstored), and a bare `node -e 0`, interleaved, the order rotating every round.
# Then 10 concurrent adds (10 files, 10 backends) and their removes, stock and ours in turn, and 40
# block-cow adds on one base at once with the service up, then 40 stock file: adds at once, each
# killed at 40 s as libxl would.
# Ours runs twice over: with the resident service (xen-blockhooks serve, started here) taking the
# events (variants served, cowsrv), and with XEN_BLOCKHOOKS_SERVE=0 running them in the wrapper
# as when the service is down (ours, cow).
# Prints `sample VARIANT OP WALL_MS CPU_MS` lines, `concurrent VARIANT OP WALL_MS FAILURES`, and
# TAP lines: a failed or unverified run is `not ok`.
. "$XBH_PROJECT/test/xen/lib.sh"

ROUNDS=${XBH_BENCH_DOM0_ROUNDS:-10}
CONC=${XBH_BENCH_DOM0_CONCURRENCY:-10}
if ! how=$(ensure_hooks); then
	not_ok "the hooks are installed" "npm run build first"
	finish
fi
note "$how"
STOCK=/etc/xen/scripts/block.stock
OURS=/etc/xen/scripts/block
if [ ! -x "$STOCK" ] || ! hook_installed ""; then
	not_ok "stock block (block.stock) and ours (block) are installed" "$(ls -l /etc/xen/scripts/ 2>&1)"
	finish
fi
note "node $(node --version), dom0 vCPUs $(nproc), load $(cut -d' ' -f1-3 /proc/loadavg)"
IMG=/var/lib/xen/images/xbh-bench
mkdir -p $IMG
i=0
while [ $i -lt "$CONC" ] || [ $i = 0 ]; do
	dd if=/dev/zero of=$IMG/d$i.img bs=1M count=8 status=none
	i=$((i + 1))
done

# nodes DOMID FILE: the backend and frontend nodes libxl writes before it runs the script.
nodes() {
	be=/local/domain/0/backend/vbd/$1/51712
	fe=/local/domain/$1/device/vbd/51712
	xenstore-write "$be/params" "$2" "$be/frontend" "$fe" "$be/frontend-id" "$1" "$be/online" 1 \
		"$be/removable" 0 "$be/bootable" 1 "$be/state" 2 "$be/dev" xvda "$be/type" phy "$be/mode" w \
		"$be/device-type" disk "$be/script" /etc/xen/scripts/block "$be/discard-enable" 0 \
		"$fe/backend-id" 0 "$fe/backend" "$be" "$fe/state" 1 "$fe/virtual-device" 51712 "$fe/device-type" disk
}
# closed DOMID: what libxl writes before remove; gone DOMID: what it deletes after.
closed() { xenstore-write "/local/domain/0/backend/vbd/$1/51712/online" 0 "/local/domain/0/backend/vbd/$1/51712/state" 6; }
gone() { xenstore-rm "/local/domain/0/backend/vbd/$1" 2>/dev/null; xenstore-rm "/local/domain/$1/device" 2>/dev/null; return 0; }

# timed VARIANT OP CMD...: one run, one sample line (wall and CPU of the run and its children).
timed() {
	v=$1 op=$2
	shift 2
	t0=$(date +%s%N)
	/usr/bin/time -f '%U %S' -o $XBH_SCRATCH/cpu "$@" >$XBH_SCRATCH/run.out 2>&1
	rc=$?
	t1=$(date +%s%N)
	cpu=$(awk '{ printf "%d", ($1 + $2) * 1000 }' $XBH_SCRATCH/cpu 2>/dev/null)
	echo "sample $v $op $(((t1 - t0) / 1000000)) ${cpu:-0}"
	return $rc
}

# served_env VARIANT: what keeps a variant's event out of the service (all but served*, cowsrv*).
served_env() { case $1 in served | served@* | cowsrv*) ;; *) echo XEN_BLOCKHOOKS_SERVE=0 ;; esac; }

# one VARIANT SCRIPT DOMID [PARAMS]: add, check, remove, check (PARAMS default: the file d0.img).
one() {
	v=$1 script=$2 d=$3
	nodes "$d" "${4:-$IMG/d0.img}"
	if ! timed "$v" add env $(served_env "$v") XENBUS_PATH=backend/vbd/$d/51712 XENBUS_TYPE=vbd XENBUS_BASE_PATH=backend script=/etc/xen/scripts/block "$script" add; then
		not_ok "$v add" "$(cat $XBH_SCRATCH/run.out)"
	fi
	pd=$(xenstore-read "/local/domain/0/backend/vbd/$d/51712/physical-device" 2>/dev/null)
	st=$(xenstore-read "/local/domain/0/backend/vbd/$d/51712/hotplug-status" 2>/dev/null)
	if [ -z "$pd" ] || [ "$st" != connected ]; then not_ok "$v add wrote physical-device and hotplug-status=connected" "pd=$pd status=$st"; fi
	closed "$d"
	if ! timed "$v" remove env $(served_env "$v") XENBUS_PATH=backend/vbd/$d/51712 XENBUS_TYPE=vbd XENBUS_BASE_PATH=backend script=/etc/xen/scripts/block "$script" remove; then
		not_ok "$v remove" "$(cat $XBH_SCRATCH/run.out)"
	fi
	gone "$d"
	# (KEEP_LOOP: a loop of the benchmark's own, the phy: disk of the scaling part.)
	left=$(losetup -a | grep -v "^${KEEP_LOOP:-/nothing}:")
	if [ -n "$left" ]; then
		not_ok "$v remove left no loop device" "$left"
		for l in $(printf '%s\n' "$left" | cut -d: -f1); do losetup -d "$l"; done
	fi
	if [ -n "$(dmsetup ls 2>/dev/null | grep -v '^No devices found')" ]; then not_ok "$v remove left no dm device" "$(dmsetup ls)"; fi
}

# block-cow on a 16 MiB base (the issue's dom0 target compares it with the stock file: add).
COW=/etc/xen/scripts/block-cow
BASE=/var/lib/xen/images/xbh-bench-base.img
dd if=/dev/zero of=$BASE bs=1M count=16 status=none
cowone() { if [ -x $COW ]; then one cow $COW 2 "$BASE 16"; fi; }

# The resident service, as its unit runs it (the channel in /run/xen-blockhooks/serve).
xen-blockhooks serve --no-watch >$XBH_SCRATCH/serve.out 2>&1 &
SPID=$!
if until_true 60 sh -c "[ \"\$(cat /run/xen-blockhooks/serve/pid 2>/dev/null)\" = $SPID ]"; then
	note "xen-blockhooks serve is up, pid $SPID"
else
	not_ok "xen-blockhooks serve is up" "$(cat $XBH_SCRATCH/serve.out)"
fi
srvone() {
	one served $OURS 3
	if [ -x $COW ]; then one cowsrv $COW 4 "$BASE 16"; fi
}

# Ours once more under another Node (XBH_BENCH_DOM0_ALT_NODE: the host's NodeSource build), installed
# by the same installer under /opt/xbh-alt: variants oursalt (its block) and nodealt (its node -e 0).
ALTNODE=${XBH_BENCH_DOM0_ALT_NODE:-}
ALT=/opt/xbh-alt/scripts/block
if [ -n "$ALTNODE" ] && [ -x "$ALTNODE" ]; then
	if NODE=$ALTNODE PREFIX=/opt/xbh-alt SYSCONFDIR=/opt/xbh-alt/etc XEN_SCRIPT_DIR=/opt/xbh-alt/scripts DESTDIR= \
		"$XBH_INSTALL" --replace-block >$XBH_SCRATCH/install-alt.log 2>&1 &&
		v=$(XEN_BLOCKHOOKS_SERVE=0 $ALT --version 2>&1) && printf '%s' "$v" | grep -q '(startup snapshot)'; then
		note "also installed under /opt/xbh-alt with node $($ALTNODE --version) ($ALTNODE): $v"
	else
		not_ok "ours installed under /opt/xbh-alt with $ALTNODE, started from its snapshot" "$v" "$(tail -5 $XBH_SCRATCH/install-alt.log)"
		ALTNODE=
	fi
else
	ALTNODE=
fi
altone() { if [ -n "$ALTNODE" ]; then one oursalt $ALT 1; timed nodealt start "$ALTNODE" -e 0; fi; }

# One warm-up round, not recorded.
one stock $STOCK 1 >/dev/null
one ours $OURS 1 >/dev/null
cowone >/dev/null
srvone >/dev/null
altone >/dev/null
node -e 0
r=0
while [ $r -lt "$ROUNDS" ]; do
	case $((r % 4)) in
	0) one stock $STOCK 1; one ours $OURS 1; cowone; srvone; altone; timed node start node -e 0 ;;
	1) one ours $OURS 1; cowone; srvone; altone; timed node start node -e 0; one stock $STOCK 1 ;;
	2) cowone; srvone; altone; timed node start node -e 0; one stock $STOCK 1; one ours $OURS 1 ;;
	3) srvone; altone; timed node start node -e 0; one stock $STOCK 1; one ours $OURS 1; cowone ;;
	esac
	# What one process start costs here (fork and exec of the smallest program), the unit the
	# hooks' own commands are counted in.
	timed true start /bin/true
	r=$((r + 1))
done
ok "latency: $ROUNDS interleaved rounds of stock and ours (block, block-cow, each with the service up and down${ALTNODE:+, block under the other node}) add+remove, and node -e 0"

# conc VARIANT SCRIPT [LOCK_TIMEOUT_MS [COUNT [PARAMS]]]: COUNT (default CONC) adds at once
# (domids 11.., one file each, or every one with PARAMS), then as many removes at once; with
# LOCK_TIMEOUT_MS, our hooks wait that long for Xen's lock (lock_timeout_ms). Each run is started
# as libxl starts a hotplug script (one fork and one exec, nothing else: a helper process per run
# would take the one vCPU from the runs being measured). With KILL_AT=S, every run still going
# S seconds after the start is killed with SIGKILL, as libxl kills a script at 40 s.
conc() {
	v=$1 hook=$2 wait=${3:-} n=${4:-$CONC} params=${5:-}
	off=$(served_env "$v")
	i=0
	while [ $i -lt "$n" ]; do nodes $((11 + i)) "${params:-$IMG/d$i.img}"; i=$((i + 1)); done
	for op in add remove; do
		if [ $op = remove ]; then i=0; while [ $i -lt "$n" ]; do closed $((11 + i)); i=$((i + 1)); done; fi
		t0=$(date +%s%N)
		i=0
		pids=
		while [ $i -lt "$n" ]; do
			(
				export XENBUS_PATH=backend/vbd/$((11 + i))/51712 XENBUS_TYPE=vbd XENBUS_BASE_PATH=backend script=/etc/xen/scripts/block
				if [ -n "$off" ]; then export XEN_BLOCKHOOKS_SERVE=0; fi
				if [ -n "$wait" ]; then export XEN_BLOCKHOOKS_LOCK_TIMEOUT_MS=$wait; fi
				exec "$hook" $op >$XBH_SCRATCH/c$i.out 2>&1
			) &
			pids="$pids $!"
			i=$((i + 1))
		done
		dog=
		if [ -n "${KILL_AT:-}" ]; then
			(
				sleep "$KILL_AT"
				kill -KILL $pids 2>/dev/null
			) &
			dog=$!
		fi
		# These runs only: a bare `wait` would wait for the service too.
		i=0
		for p in $pids; do
			wait "$p"
			echo $? >$XBH_SCRATCH/c$i.rc
			i=$((i + 1))
		done
		t1=$(date +%s%N)
		if [ -n "$dog" ]; then kill "$dog" 2>/dev/null; wait "$dog" 2>/dev/null; fi
		# Runs that failed: a non-zero exit, or an add whose backend is not connected (counted once).
		fail=0
		i=0
		while [ $i -lt "$n" ]; do
			if [ "$(cat $XBH_SCRATCH/c$i.rc)" != 0 ] ||
				{ [ $op = add ] && [ "$(xenstore-read /local/domain/0/backend/vbd/$((11 + i))/51712/hotplug-status 2>/dev/null)" != connected ]; }; then
				fail=$((fail + 1))
			fi
			i=$((i + 1))
		done
		if [ $op = add ]; then
			# Every connected disk has its own device (no loop handed out twice).
			pds=$(i=0; while [ $i -lt "$n" ]; do xenstore-read /local/domain/0/backend/vbd/$((11 + i))/51712/physical-device 2>/dev/null; echo; i=$((i + 1)); done | grep .)
			[ "$(printf '%s\n' "$pds" | sort -u | grep -c .)" = "$(printf '%s\n' "$pds" | grep -c .)" ] || not_ok "$v: a device was handed out twice" "$pds"
		fi
		echo "concurrent $v $op $(((t1 - t0) / 1000000)) $fail"
		if [ "$fail" != 0 ]; then
			i=0
			shown=0
			while [ $i -lt "$n" ] && [ $shown -lt 12 ]; do
				if [ "$(cat $XBH_SCRATCH/c$i.rc)" != 0 ]; then
					note "$v $op $((11 + i)): exit $(cat $XBH_SCRATCH/c$i.rc) $(tail -c 300 $XBH_SCRATCH/c$i.out | tr '\n' ' ')"
					shown=$((shown + 1))
				fi
				i=$((i + 1))
			done
		fi
	done
	i=0
	while [ $i -lt "$n" ]; do gone $((11 + i)); i=$((i + 1)); done
	# A remove that failed (e.g. its lock wait ran out) keeps its record for gc, as it should; the
	# benchmark takes it away so the next trial starts clean, and the failure is in the table.
	node "$XBH_DIST/xen-blockhooks.mjs" gc --apply >/dev/null 2>&1
	if [ -n "$(losetup -a)" ]; then note "$v: loops left after the concurrent removes and gc: $(losetup -a | tr '\n' ' ')"; losetup -D; fi
	# A stock script killed while it held Xen's lock leaves the lock file linked (locking.sh
	# allows that: the next holder takes it over); every run has ended, so nobody holds it now.
	if [ -e /run/xen-hotplug/block ]; then note "$v: a killed run left /run/xen-hotplug/block linked"; rm -f /run/xen-hotplug/block; fi
}
WAIT=${XBH_BENCH_DOM0_LOCK_WAIT_MS:-120000}
if [ "$CONC" != 0 ]; then
	conc stock $STOCK
	conc ours $OURS
	conc ours-wait $OURS "$WAIT"
	conc served $OURS
	conc stock $STOCK
	conc served $OURS
	ok "concurrency: $CONC adds and removes at once: stock (twice), ours (lock_timeout_ms default 20 s), ours waiting up to $WAIT ms for the lock, ours with the service up (twice)"
fi
# COW_CONC block-cow disks on one base at once, with the service up, then as many stock file:
# disks at once (one file each), every run killed at 40 s as libxl would.
COW_CONC=${XBH_BENCH_DOM0_COW_CONCURRENCY:-40}
if [ -x $COW ] && [ "$COW_CONC" -gt 0 ]; then
	logfrom=$(($(wc -l </var/log/xen/xen-hotplug.log 2>/dev/null || echo 0) + 1))
	KILL_AT=40 conc cowsrv$COW_CONC $COW "" "$COW_CONC" "$BASE 16"
	i=$CONC
	while [ $i -lt "$COW_CONC" ]; do
		dd if=/dev/zero of=$IMG/d$i.img bs=1M count=1 status=none
		i=$((i + 1))
	done
	KILL_AT=40 conc stock$COW_CONC $STOCK "" "$COW_CONC"
	ok "concurrency: $COW_CONC block-cow adds on one base and their removes at once, with the service up; $COW_CONC stock file: adds and removes at once"
	if [ -n "${XBH_BENCH_DOM0_SHOW_LOG:-}" ]; then
		tail -n +$logfrom /var/log/xen/xen-hotplug.log | grep -v ' debug ' | grep -v '^+' | head -n 150 | sed 's/^/# log: /'
		sed 's/^/# serve: /' $XBH_SCRATCH/serve.out | tail -n 20
	fi
fi
# How an add grows with the vbds already present (XBH_BENCH_DOM0_SCALING, default 0,50,200; empty: skipped):
# N other vbds in xenstore, each with the keys libxl writes, a physical-device and
# hotplug-status connected, as connected disks have. On a phy: disk (a loop device: for a block
# device the stock script's sharing check reads every other vbd's physical-device with a
# xenstore-read each; for a file: disk not yet on a loop it skips that walk): stock, and ours with
# the service up. And block-cow with the service up, whose base check reads every other vbd.
# SCALE_ROUNDS interleaved cycles each (sample lines VARIANT@N).
SCALING=$(echo "${XBH_BENCH_DOM0_SCALING-0,50,200}" | tr , ' ')
SCALE_ROUNDS=${XBH_BENCH_DOM0_SCALE_ROUNDS:-3}
if [ -n "$SCALING" ]; then
	PHY=$(losetup --find --show -- $IMG/d0.img)
	KEEP_LOOP=$PHY
	present=0
	for N in $SCALING; do
		set --
		while [ $present -lt "$N" ]; do
			be=/local/domain/0/backend/vbd/$((20000 + present))/51712
			set -- "$@" "$be/params" "/srv/xen/other-$present.img" "$be/mode" w "$be/type" phy \
				"$be/script" /etc/xen/scripts/block "$be/state" 4 "$be/hotplug-status" connected \
				"$be/physical-device" "7:$(printf %x $((200 + present)))" "$be/physical-device-path" "/dev/loop$((200 + present))"
			present=$((present + 1))
			# One xenstore-write per 25 vbds (its argument list stays short).
			if [ $((present % 25)) = 0 ]; then xenstore-write "$@"; set --; fi
		done
		if [ $# -gt 0 ]; then xenstore-write "$@"; set --; fi
		r=0
		while [ $r -lt "$SCALE_ROUNDS" ]; do
			case $((r % 3)) in
			0) one stock@$N $STOCK 5 "$PHY"; one served@$N $OURS 6 "$PHY"; one cowsrv@$N $COW 7 "$BASE 16" ;;
			1) one served@$N $OURS 6 "$PHY"; one cowsrv@$N $COW 7 "$BASE 16"; one stock@$N $STOCK 5 "$PHY" ;;
			2) one cowsrv@$N $COW 7 "$BASE 16"; one stock@$N $STOCK 5 "$PHY"; one served@$N $OURS 6 "$PHY" ;;
			esac
			r=$((r + 1))
		done
		note "scaling: $N other vbds present, $SCALE_ROUNDS rounds"
	done
	xenstore-rm /local/domain/0/backend/vbd 2>/dev/null
	losetup --detach "$PHY"
	KEEP_LOOP=
	ok "scaling: stock and ours (block phy:, block-cow) add+remove with $SCALING other vbds present"
fi
kill -TERM $SPID
wait $SPID || not_ok "the service stopped with exit 0" "$(cat $XBH_SCRATCH/serve.out)"
rm -rf $IMG $BASE
expect_nothing_left "after the dom0 benchmark"
finish
