# A real live migration on one host: `xl migrate -s '' NAME 'xl migrate-receive'` (no ssh: the
# receiver is a local command, its domain named NAME--incoming until the migration completes).
# A PV guest cannot migrate here (Debian's Xen is built without shadow paging, which PV log-dirty
# needs), so the guest is the same kernel and rereading init as scenario 80's, booted as PVH
# (HAP log-dirty; Xen sees HAP in QEMU's emulated SVM). tsc_mode="native": in Xen's default mode
# the guest's RDTSC/RDTSCP are intercepted (TCG's TSC is not invariant), QEMU's TCG reports an
# RDTSCP as an RDTSC exit without a next-RIP, and Xen refuses the length of the instruction it
# finds ("Insn mismatch: Expected opcode 0xf0031 ... SVM Insn len emulation failed ... 0f 01 f9"):
# the guest dies early in its boot. cpuid="host,rdtscp=0" boots too.
#   1. block-cow transient: refused at the receiver (its data lives in the sender's devices); the
#      migration fails, the sender resumes on its own device and keeps reading its pattern;
#   2. block-cow persistent: refused busy at the receiver on one host (the suspended sender's loop
#      holds the store); the sender resumes and keeps reading its pattern;
#   3. `block` on a raw file: the receiver shares the file with its own VM; the migration completes
#      and the guest, in its new domain, keeps reading its pattern from the file.
# Each case ends with xl destroy and nothing left behind.
. "$XBH_PROJECT/test/xen/lib.sh"

require_hooks
IMAGES=/var/lib/xen/images
BASE=$IMAGES/xbh-live.img
mkdir -p $IMAGES
make_base $BASE 32
sum0=$(sha256sum <$BASE)

# The console log follows the name the domain had when xenconsoled met it: after a migration the
# guest's lines go on in guest-NAME--incoming.log (the guest's own numbering orders them).
console_log() { cat "$XBH_CONSOLE_LOGS/guest-$1.log" "$XBH_CONSOLE_LOGS/guest-$1--incoming.log" 2>/dev/null; }

# pvh_cfg NAME MARKER DISK: a PVH domU in reread mode → the config path.
pvh_cfg() {
	cfg=$XBH_SCRATCH/$1.cfg
	cat >"$cfg" <<-EOF
		name = "$1"
		type = "pvh"
		kernel = "$XBH_DOMU_KERNEL"
		ramdisk = "$XBH_DOMU_RAMDISK"
		extra = "console=hvc0 quiet xbh_mode=reread xbh_marker=$2"
		tsc_mode = "native"
		memory = 128
		vcpus = 1
		on_poweroff = "destroy"
		on_crash = "destroy"
		disk = ["$3"]
	EOF
	echo "$cfg"
}

# start_pvh NAME MARKER WHAT DISK: xl create, then the guest writes its pattern and re-reads it.
start_pvh() {
	xl_create "xl create $1 (PVH, $3)" "$(pvh_cfg "$1" "$2" "$4")" || return 1
	if until_true 90 reread_past "$1" 2; then ok "$1 wrote its pattern and re-reads it"; else not_ok "$1 re-reads its pattern" "$(console_log "$1" | tail -20)"; xl destroy "$1" 2>/dev/null; return 1; fi
}

# migrate NAME: the same-host live migration; its output in MIGRATE_OUT, its status returned.
migrate() {
	t=$(ms)
	MIGRATE_OUT=$(timeout 150 xl migrate -s '' "$1" 'xl migrate-receive' 2>&1)
	rc=$?
	note "xl migrate -s '' $1 'xl migrate-receive': exit $rc ($(($(ms) - t)) ms), its last lines:"
	printf '%s\n' "$MIGRATE_OUT" | grep -v '^xc: info' | tail -8 | while read -r l; do note "  $l"; done
	return $rc
}

# refused_migration NAME MARKER WHAT REASON: the migration of a running guest fails at the receiver
# with REASON (a hotplug-error, grep pattern) in xl's output; the sender resumes as the same domain
# and reads its own pattern on; its destroy leaves nothing (but the files the caller removes).
refused_migration() {
	old=$(domid "$1")
	before=$(last_reread "$1")
	if migrate "$1"; then
		not_ok "$3: xl migrate $1 is refused at the receiver" "$MIGRATE_OUT"
	else
		ok "$3: xl migrate $1 is refused at the receiver"
	fi
	if printf '%s\n' "$MIGRATE_OUT" | grep -q -- "$4"; then
		ok "$3: xl shows the hook's reason: $(printf '%s\n' "$MIGRATE_OUT" | grep -o -- "$4.*" | head -1 | cut -c1-160)"
	else
		not_ok "$3: xl shows the hook's reason ($4)" "$MIGRATE_OUT"
	fi
	if printf '%s\n' "$MIGRATE_OUT" | grep -q 'resuming at sender'; then ok "$3: xl resumes the sender"; else not_ok "$3: xl resumes the sender" "$MIGRATE_OUT"; fi
	until_true 30 domain_gone "$1--incoming" || not_ok "$3: the refused receiver left no domain" "$(xl list 2>&1)"
	if [ "$(domid "$1")" = "$old" ]; then ok "$3: $1 is still domain $old"; else not_ok "$3: $1 is still domain $old" "$(xl list 2>&1)"; fi
	keeps_pattern "$1" "$2" "$before" "the refused migration"
}

# --- 1. block-cow transient ----------------------------------------------------------------------
if start_pvh xbhlivet t1 "block-cow transient" "format=raw, vdev=xvda, access=rw, script=block-cow, target=$BASE 32"; then
	refused_migration xbhlivet t1 "block-cow transient" "receiving end of a live migration"
	check "block-cow transient: the sender's snapshot is the only device-mapper device" sh -c '[ "$(dmsetup ls | grep -c xbh-cow-)" = 1 ]'
	check "xl destroy xbhlivet" xl destroy xbhlivet
	expect_nothing_left "block-cow transient: after the refused migration and the sender's destroy"
fi

# --- 2. block-cow persistent ---------------------------------------------------------------------
STORE=/var/lib/xen-blockhooks/xbhlivep-xvda.cow
if start_pvh xbhlivep p2 "block-cow persistent" "format=raw, vdev=xvda, access=rw, script=block-cow, target=$BASE 32 persistent"; then
	refused_migration xbhlivep p2 "block-cow persistent" "a store serves one writer"
	check "xl destroy xbhlivep" xl destroy xbhlivep
	until_true 20 sh -c '[ -z "$(dmsetup ls 2>/dev/null | grep xbh-)" ]'
	if [ -f $STORE ]; then ok "block-cow persistent: the store is kept"; else not_ok "block-cow persistent: the store is kept" "$(find /var/lib/xen-blockhooks -type f)"; fi
	rm -f $STORE
	expect_nothing_left "block-cow persistent: after the refused migration and the sender's destroy (its store deleted by hand)"
fi

# --- 3. block, a raw file ------------------------------------------------------------------------
IMG=$IMAGES/xbh-live-file.img
cp $BASE $IMG
if start_pvh xbhlivef f3 "block, raw file" "format=raw, vdev=xvda, access=rw, target=$IMG"; then
	old=$(domid xbhlivef)
	if migrate xbhlivef; then ok "block: xl migrate xbhlivef"; else not_ok "block: xl migrate xbhlivef" "$MIGRATE_OUT"; fi
	# The sender is destroyed before xl migrate returns: rereads numbered past this are the new domain's.
	before=$(last_reread xbhlivef)
	if printf '%s\n' "$MIGRATE_OUT" | grep -q '^Migration successful'; then ok "block: xl reports the migration successful"; else not_ok "block: xl reports the migration successful" "$MIGRATE_OUT"; fi
	new=$(domid xbhlivef)
	if [ -n "$new" ] && [ "$new" != "$old" ]; then ok "block: xbhlivef runs as a new domain ($old → $new)"; else not_ok "block: xbhlivef runs as a new domain" "$(xl list 2>&1)"; fi
	if until_true 30 sh -c '! xl list | grep -q -- "xbhlivef--"'; then ok "block: no --incoming or --migratedaway domain is left"; else not_ok "block: no --incoming or --migratedaway domain is left" "$(xl list 2>&1)"; fi
	[ -n "$new" ] && expect_connected "block: the migrated domain's disk" "$(vbd_backend "$new" 51712)"
	keeps_pattern xbhlivef f3 "$before" "the migration"
	if [ "$(console_log xbhlivef | grep -c 'xbh-domu: wrote')" = 1 ]; then ok "block: the guest wrote its pattern once (it did not boot again)"; else not_ok "block: the guest wrote its pattern once" "$(console_log xbhlivef | grep -v reread)"; fi
	check "block: one loop device is left on the image (the sender's is gone)" sh -c "[ \"\$(losetup -j $IMG | wc -l)\" = 1 ]"
	check "xl destroy xbhlivef" xl destroy xbhlivef
	expect_nothing_left "block: after destroying the migrated domain"
fi
rm -f $IMG

if [ "$(sha256sum <$BASE)" = "$sum0" ]; then ok "the base image is unchanged (sha256)"; else not_ok "the base image is unchanged"; fi
rm -f $BASE
finish
