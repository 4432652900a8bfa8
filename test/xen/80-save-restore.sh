# xl save + xl restore of a PV domU on block-cow disks, as Debian's xendomains does at every
# dom0 shutdown and boot. The guest writes its pattern at 0 and at 1 MiB and re-reads both from
# the disk every second (page cache dropped, O_DIRECT); across the save and the restore its memory
# expects exactly what it wrote. Three cases:
#   1. transient store, same boot: the save's remove holds the devices (the domain is suspended),
#      the restore's add reattaches them: the guest keeps reading its pattern, on the same device.
#   2. transient store, dom0 restarted in between (the held devices torn down, /run cleared, the
#      boot cleanup run, the marker from another boot): the restore is refused with a
#      hotplug-error that says why, and builds nothing.
#   3. persistent store, dom0 restarted in between: the store (dm-snapshot P) is reattached and
#      the guest keeps reading its pattern.
. "$XBH_PROJECT/test/xen/lib.sh"

if ! how=$(ensure_hooks); then
	not_ok "install the hooks for save/restore" "$(cat "$XBH_SCRATCH/install.log" 2>/dev/null)"
	finish
fi
note "$how"
BASE=/var/lib/xen/images/xbh-save.img
mkdir -p /var/lib/xen/images
make_base $BASE 32
sum0=$(sha256sum <$BASE)
CLI="node $XBH_DIST/xen-blockhooks.mjs"
SAVED=/var/lib/xen-blockhooks/saved

# last_reread NAME: the number of the guest's last "reread #N" line (0 if none).
last_reread() { console_log "$1" | sed -n 's/.*xbh-domu: reread #\([0-9]*\) .*/\1/p' | tail -n 1 | grep . || echo 0; }
# rereads_after NAME N: the reread lines numbered above N.
rereads_after() { console_log "$1" | grep 'xbh-domu: reread #' | awk -v n="$2" '{ split($3, a, "#"); if (a[2] + 0 > n) print }'; }
reread_past() { [ "$(last_reread "$1")" -gt "$2" ]; }

# start NAME MARKER SPEC-TAIL [HOOK TARGET]: xl create a rereading domU on a disk of HOOK (default
# block-cow over the base); waits for 3 rereads.
start() {
	hook=${4:-cow}
	cfg=$(domu_cfg "$1" reread "xbh_marker=$2" "format=raw, vdev=xvda, access=rw, script=block-$hook, target=${5:-$BASE} $3")
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

# --- 1. transient store, same boot -----------------------------------------------------------
if start xbhsave s1 32; then
	be=$(vbd_backend "$(domid xbhsave)" 51712)
	pd=$(xenstore-read "$be/physical-device")
	uuid=$(xenstore-read "/local/domain/$(domid xbhsave)/vm" | sed 's,^/vm/,,')
	save xbhsave || { expect_nothing_left "after the failed save"; finish; }
	before=$(last_reread xbhsave)
	if [ -f "$SAVED/$uuid-51712.json" ]; then ok "the save left a marker for the saved disk"; else not_ok "the save left a marker for the saved disk" "$(ls -la $SAVED 2>&1)"; fi
	if $CLI status 2>&1 | grep -q ' held'; then ok "status shows the disk held for the saved domain"; else not_ok "status shows the disk held" "$($CLI status 2>&1)"; fi
	check "the snapshot device is still there while the domain is saved" sh -c '[ "$(dmsetup table | grep -c " snapshot ")" = 1 ]'
	if restore xbhsave; then ok "xl restore xbhsave"; else not_ok "xl restore xbhsave" "$RESTORE_OUT"; fi
	be2=$(vbd_backend "$(domid xbhsave)" 51712)
	if [ "$(xenstore-read "$be2/physical-device" 2>&1)" = "$pd" ]; then ok "the restored domain got the very device it was saved with ($pd)"; else not_ok "the restored domain got the device it was saved with" "before: $pd" "now: $(xenstore-read "$be2/physical-device" 2>&1)"; fi
	xl unpause xbhsave
	expect_connected "restored xbhsave" "$be2"
	keeps_pattern xbhsave s1 "$before"
	if [ -z "$(ls $SAVED 2>/dev/null)" ]; then ok "the restore used up the marker"; else not_ok "the restore used up the marker" "$(ls -la $SAVED)"; fi
	check "xl destroy xbhsave" xl destroy xbhsave
	expect_nothing_left "after destroying the restored domain"
fi

# --- 2. transient store, dom0 restarted in between ---------------------------------------------
# reboot_dom0: what a dom0 restart does to the hooks' world, short of restarting: every device they
# built goes, /run/xen-blockhooks goes, time passes; then the boot cleanup runs (gc --apply, the
# command of the installed xen-blockhooks-boot unit).
reboot_dom0() {
	for d in $(dmsetup ls 2>/dev/null | awk '/^xbh-/{print $1}'); do dmsetup remove "$d"; done
	for l in $(losetup -a 2>/dev/null | cut -d: -f1); do losetup -d "$l"; done
	rm -rf /run/xen-blockhooks
	find /var/lib/xen-blockhooks -name '*.cow' -exec touch -d '10 minutes ago' {} +
	for m in "$SAVED"/*.json; do [ -f "$m" ] && sed -i 's/"bootId": "[^"]*"/"bootId": "an-earlier-boot"/' "$m"; done
	out=$($CLI gc --apply 2>&1)
	note "boot cleanup: xen-blockhooks gc --apply: exit $?"
	printf '%s\n' "$out" | while read -r l; do note "  $l"; done
}

if start xbhboot s2 32; then
	uuid=$(xenstore-read "/local/domain/$(domid xbhboot)/vm" | sed 's,^/vm/,,')
	save xbhboot || { expect_nothing_left "after the failed save"; finish; }
	reboot_dom0
	if find /var/lib/xen-blockhooks -name 'transient-*.cow' | grep -q .; then
		not_ok "the boot cleanup deleted the transient store nothing uses" "$(find /var/lib/xen-blockhooks -type f)"
	else
		ok "the boot cleanup deleted the transient store nothing uses"
	fi
	if $CLI status 2>&1 | grep -q ' lost'; then ok "status shows the saved disk as lost"; else not_ok "status shows the saved disk as lost" "$($CLI status 2>&1)"; fi
	if restore xbhboot; then
		not_ok "xl restore xbhboot is refused after the restart" "$RESTORE_OUT"
		xl destroy xbhboot 2>/dev/null
	else
		ok "xl restore xbhboot is refused after the restart"
	fi
	if printf '%s\n' "$RESTORE_OUT" | grep -q "did not survive"; then ok "xl shows the hook's reason: $(printf '%s\n' "$RESTORE_OUT" | grep -o 'the saved domain.*did not survive[^.]*' | head -1)"; else not_ok "xl shows why the restore was refused" "$RESTORE_OUT"; fi
	until_true 30 domain_gone xbhboot || not_ok "the refused restore left no domain" "$(xl list 2>&1)"
	if [ -f "$SAVED/$uuid-51712.json" ]; then ok "the marker stays, so a second restore is refused too"; else not_ok "the marker stays" "$(ls -la $SAVED 2>&1)"; fi
	if restore xbhboot; then not_ok "a second xl restore is refused too"; xl destroy xbhboot 2>/dev/null; else ok "a second xl restore is refused too"; fi
	until_true 30 domain_gone xbhboot
	rm -f "$SAVED/$uuid-51712.json"
	expect_nothing_left "after the refused restores (marker deleted by hand, as the message says)"
fi

# --- 3. persistent store, dom0 restarted in between --------------------------------------------
if start xbhpers s3 "32 persistent"; then
	save xbhpers || { expect_nothing_left "after the failed save"; finish; }
	before=$(last_reread xbhpers)
	if [ -z "$(ls $SAVED 2>/dev/null)" ]; then ok "nothing is held for a persistent store (its data outlives the devices)"; else not_ok "nothing is held for a persistent store" "$(ls -la $SAVED)"; fi
	reboot_dom0
	if [ -f /var/lib/xen-blockhooks/xbhpers-xvda.cow ]; then ok "the boot cleanup kept the persistent store"; else not_ok "the boot cleanup kept the persistent store" "$(find /var/lib/xen-blockhooks -type f)"; fi
	if restore xbhpers; then ok "xl restore xbhpers after the restart"; else not_ok "xl restore xbhpers after the restart" "$RESTORE_OUT"; fi
	xl unpause xbhpers
	keeps_pattern xbhpers s3 "$before"
	check "xl destroy xbhpers" xl destroy xbhpers
	until_true 20 sh -c '[ -z "$(dmsetup ls 2>/dev/null | grep xbh-)" ]'
	rm -f /var/lib/xen-blockhooks/xbhpers-xvda.cow
	expect_nothing_left "after destroying xbhpers (its persistent store deleted by hand)"
fi
# --- 4. a migration's receiving end, with the sender's devices live ------------------------------
# What xl migrate-receive does first on the receiving host: create the domain paused, named
# NAME--incoming, with the sender's disks. The sender (here on the same host) keeps its devices
# until the receiver has its own. A PV guest cannot really migrate here (Debian's Xen is built
# without shadow paging), so the receiver is created as migrate-receive would create it.
if start xbhmig s4 32; then
	cfg=$(domu_cfg xbhmig--incoming reread "xbh_marker=s4" "format=raw, vdev=xvda, access=rw, script=block-cow, target=$BASE 32")
	if out=$(xl create -p "$cfg" 2>&1); then
		not_ok "the receiving end (xbhmig--incoming) is refused the transient disk" "$out"
		xl destroy xbhmig--incoming 2>/dev/null
	else
		ok "the receiving end (xbhmig--incoming) is refused the transient disk"
	fi
	if printf '%s\n' "$out" | grep -q "receiving end of a live migration"; then ok "xl shows the hook's reason"; else not_ok "xl shows the hook's reason" "$out"; fi
	until_true 30 domain_gone xbhmig--incoming || not_ok "the refused receiver left no domain" "$(xl list 2>&1)"
	before=$(last_reread xbhmig)
	keeps_pattern xbhmig s4 "$before" "the refused migration"
	check "the sender's snapshot is its only device-mapper device" sh -c '[ "$(dmsetup ls | grep -c xbh-cow-)" = 1 ]'
	check "xl destroy xbhmig" xl destroy xbhmig
	expect_nothing_left "after the refused receiver and the sender's destroy"
fi

# --- 5. the other hooks the tier hosts, save + restore in one boot ----------------------------------
QCOW=/var/lib/xen/images/xbh-save.qcow2
for hook in qcow thin; do
	hook_installed $hook || { not_ok "block-$hook is installed"; continue; }
	case $hook in
	qcow) qemu-img convert -O qcow2 $BASE $QCOW && target=$QCOW tail="overlay=transient" ;;
	thin) target=$BASE tail=64 ;;
	esac
	name=xbh$hook
	start $name "s$hook" "$tail" $hook "$target" || continue
	be=$(vbd_backend "$(domid $name)" 51712)
	pd=$(xenstore-read "$be/physical-device")
	save $name || continue
	before=$(last_reread $name)
	if restore $name; then ok "xl restore $name"; else not_ok "xl restore $name" "$RESTORE_OUT"; fi
	be=$(vbd_backend "$(domid $name)" 51712)
	if [ "$(xenstore-read "$be/physical-device" 2>&1)" = "$pd" ]; then ok "block-$hook: the restored domain got the device it was saved with ($pd)"; else not_ok "block-$hook: the restored domain got the device it was saved with" "before: $pd" "now: $(xenstore-read "$be/physical-device" 2>&1)"; fi
	xl unpause $name
	keeps_pattern $name "s$hook" "$before"
	check "xl destroy $name" xl destroy $name
	expect_nothing_left "block-$hook: after destroying the restored domain"
done
rm -f $QCOW

if [ "$(sha256sum <$BASE)" = "$sum0" ]; then ok "the base image is unchanged (sha256)"; else not_ok "the base image is unchanged"; fi
rm -f $BASE "$XBH_SCRATCH"/*.save
finish
