# The plumbing, with a trivial block script of our own (not the project's hooks): xl create of
# a PV domU whose disk script attaches a loop device and reports physical-device; blkback
# connects, the guest writes a marker to /dev/xvda and reads it back, powers off, and xl runs
# the script's remove, which detaches the loop. Proves the tier before the hooks are involved.
. "$XBH_PROJECT/test/xen/lib.sh"

S=/etc/xen/scripts/block-xbhplumb
cat >$S <<'SCRIPT'
#!/bin/sh
# add: loop the target, report it; remove: detach the loop found from physical-device-path.
exec >>/var/log/xen/xbhplumb.log 2>&1
echo "$(date +%T) $1 XENBUS_PATH=$XENBUS_PATH"
case "$1" in
add)
	target=$(xenstore-read "$XENBUS_PATH/params")
	dev=$(losetup -f --show -- "$target") || exit 1
	mm=$(printf '%x:%x' $(stat -L -c '0x%t 0x%T' "$dev"))
	xenstore-write "$XENBUS_PATH/physical-device-path" "$dev" "$XENBUS_PATH/physical-device" "$mm" \
		"$XENBUS_PATH/hotplug-status" connected
	;;
remove)
	dev=$(xenstore-read "$XENBUS_PATH/physical-device-path") && losetup -d "$dev"
	xenstore-write "$XENBUS_PATH/hotplug-status" disconnected 2>/dev/null
	exit 0
	;;
esac
SCRIPT
chmod 755 $S

IMG=$XBH_SCRATCH/plumb.img
make_base $IMG 16
cfg=$(domu_cfg xbhplumb marker "xbh_marker=plumb1 xbh_linger=30" "format=raw, vdev=xvda, access=rw, script=block-xbhplumb, target=$IMG")
xl_create "xl create with a trivial script" "$cfg" || finish
id=$(domid xbhplumb)
be=$(vbd_backend "$id" 51712)
expect_connected "trivial script" "$be"
if wait_console xbhplumb "xbh-domu: done" 60; then
	ok "the domU booted and finished ($(console_log xbhplumb | grep -c xbh-domu) lines on its console)"
else
	not_ok "the domU booted and finished" "$(console_log xbhplumb | tail -20)"
fi
if console_has xbhplumb "readback=XBH:plumb1"; then ok "the domU read back its marker from /dev/xvda"; else not_ok "the domU read back its marker" "$(console_log xbhplumb | grep xbh-domu)"; fi
if console_has xbhplumb "base=BASE-IMAGE-DATA"; then ok "the domU saw the image's data at 4096"; else not_ok "the domU saw the image's data" "$(console_log xbhplumb | grep xbh-domu)"; fi
if until_true 60 domain_gone xbhplumb; then ok "the domU powered off and was destroyed"; else not_ok "the domU powered off" "$(xl list)"; xl destroy xbhplumb; fi
check "the marker is in the image (the loop was read-write)" sh -c "dd if=$IMG bs=16 count=1 status=none | grep -q XBH:plumb1"
if until_true 15 sh -c '[ -z "$(losetup -a)" ]'; then ok "xl ran remove: no loop left"; else not_ok "xl ran remove: no loop left" "$(losetup -a)" "$(cat /var/log/xen/xbhplumb.log)"; fi
if until_true 10 sh -c "! xenstore-exists $be"; then ok "the backend node is gone"; else not_ok "the backend node is gone" "$(xenstore-ls -f $be)"; fi
note "script log:" "$(cat /var/log/xen/xbhplumb.log)"
rm -f $S
finish
