# xl save + xl restore of a PV domU on block-cow disks, as Debian's xendomains does at every
# dom0 shutdown and boot. The guest writes its pattern at 0 and at 1 MiB and re-reads both from
# the disk every second (page cache dropped, O_DIRECT; helpers in lib.sh); across the save and the
# restore its memory expects exactly what it wrote. Three cases (82 has the migration's receiver
# and the other hooks):
#   1. transient store, same boot: the save's remove holds the devices (the domain is suspended),
#      the restore's add reattaches them: the guest keeps reading its pattern, on the same device.
#   2. transient store, dom0 restarted in between (the held devices torn down, /run cleared, the
#      boot cleanup run, the marker from another boot): the restore is refused with a
#      hotplug-error that says why, and builds nothing.
#   3. persistent store, dom0 restarted in between: the save takes the devices down and keeps only
#      this host's claim on the store (a marker names it; the boot cleanup keeps it), the restore
#      reattaches the store (dm-snapshot P), takes the claim over, and the guest keeps reading its
#      pattern.
. "$XBH_PROJECT/test/xen/lib.sh"

require_hooks
BASE=/var/lib/xen/images/xbh-save.img
mkdir -p /var/lib/xen/images
make_base $BASE 32
sum0=$(sha256sum <$BASE)
REREAD_BASE=$BASE

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
	for o in /var/lib/xen-blockhooks/*.owner/owner.json; do [ -f "$o" ] && sed -i 's/"boot":"[^"]*"/"boot":"an-earlier-boot"/' "$o"; done
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
PSTORE=/var/lib/xen-blockhooks/xbhpers-xvda.cow
if start xbhpers s3 "32 persistent"; then
	uuid=$(xenstore-read "/local/domain/$(domid xbhpers)/vm" | sed 's,^/vm/,,')
	save xbhpers || { expect_nothing_left "after the failed save"; finish; }
	before=$(last_reread xbhpers)
	check "the save took the persistent disk's devices down (its data is in the store)" sh -c '[ -z "$(dmsetup ls 2>/dev/null | grep xbh-)" ]'
	if grep -q '"claims"' "$SAVED/$uuid-51712.json" 2>/dev/null && [ -f "$PSTORE.owner/owner.json" ]; then ok "the save kept this host's claim on the store, named by a marker"; else not_ok "the save kept the claim on the store" "$(ls -la $SAVED $PSTORE.owner 2>&1)"; fi
	reboot_dom0
	if [ -f $PSTORE ]; then ok "the boot cleanup kept the persistent store"; else not_ok "the boot cleanup kept the persistent store" "$(find /var/lib/xen-blockhooks -type f)"; fi
	if [ -f "$PSTORE.owner/owner.json" ]; then ok "the boot cleanup kept the claim for the saved domain"; else not_ok "the boot cleanup kept the claim" "$(find /var/lib/xen-blockhooks 2>&1)"; fi
	if restore xbhpers; then ok "xl restore xbhpers after the restart"; else not_ok "xl restore xbhpers after the restart" "$RESTORE_OUT"; fi
	be3=$(vbd_backend "$(domid xbhpers)" 51712)
	if grep -q "\"backendPath\":\"${be3#/local/domain/0/}\"" "$PSTORE.owner/owner.json" 2>/dev/null; then ok "the restored disk took the claim over"; else not_ok "the restored disk took the claim over" "$(cat $PSTORE.owner/owner.json 2>&1)"; fi
	if [ ! -f "$SAVED/$uuid-51712.json" ]; then ok "the restore used up the marker"; else not_ok "the restore used up the marker" "$(ls -la $SAVED)"; fi
	xl unpause xbhpers
	keeps_pattern xbhpers s3 "$before"
	check "xl destroy xbhpers" xl destroy xbhpers
	until_true 20 sh -c '[ -z "$(dmsetup ls 2>/dev/null | grep xbh-)" ]'
	rm -f /var/lib/xen-blockhooks/xbhpers-xvda.cow
	expect_nothing_left "after destroying xbhpers (its persistent store deleted by hand)"
fi
if [ "$(sha256sum <$BASE)" = "$sum0" ]; then ok "the base image is unchanged (sha256)"; else not_ok "the base image is unchanged"; fi
rm -f $BASE "$XBH_SCRATCH"/*.save
finish
