# The xend path: the generic `block` script (the project's drop-in, installed with
# --replace-block) called as xend's udev rule called it — `block create` / `block destroy`
# with a backend whose type node is `cow` — must fall through to block-cow. The nodes are
# written as xend wrote them, for a real running domU, so blkback connects for real and the
# guest sees the disk appear and disappear.
. "$XBH_PROJECT/test/xen/lib.sh"

require_hooks
if ! hook_installed "" || ! hook_installed cow; then
	not_ok "the drop-in block and block-cow are installed" "$(ls -l /etc/xen/scripts/block* 2>&1)"
	finish
fi
mkdir -p /var/lib/xen/images
BASE=/var/lib/xen/images/xbh-xend.img
make_base $BASE 32
sum0=$(sha256sum <$BASE)

cfg=$(domu_cfg xbhxend watch "xbh_cycles=1")
xl_create "xl create xbhxend (no disks)" "$cfg" || finish
id=$(domid xbhxend)
wait_console xbhxend "xbh-domu: ready" 90 || not_ok "xbhxend is up" "$(console_log xbhxend | tail)"

DEVID=51728
fe=/local/domain/$id/device/vbd/$DEVID
be=/local/domain/0/backend/vbd/$id/$DEVID
rel=backend/vbd/$id/$DEVID
# xend's DevController.createDevice wrote both halves in one transaction, the frontend owned
# by the guest and the backend readable by it. With one xenstore-* command per write the guest
# must not look at its frontend before the backend is complete (blkfront would probe, fail to
# read "the other end" and never retry): the guest is paused meanwhile, and its watch events
# wait in xenstored until it runs again. Frontend first, so blkback's probe finds it.
xl pause xbhxend
xenstore-write $fe/backend $be $fe/backend-id 0 $fe/virtual-device $DEVID $fe/device-type disk $fe/state 1
xenstore-chmod -r $fe n$id r0
xenstore-write $be/domain xbhxend $be/frontend $fe $be/frontend-id $id $be/dev xvdb $be/type cow \
	$be/params "$BASE 16" $be/mode w $be/bootable 0 $be/online 1 $be/state 1
xenstore-chmod -r $be n0 r$id
xl unpause xbhxend
until_true 20 sh -c "[ \"\$(xenstore-read $be/state)\" = 2 ]" && ok "blkback took the backend (state 2, InitWait)" ||
	not_ok "blkback took the backend (state 2)" "state=$(backend_state $be)"

# What xen-backend.rules ran: XENBUS_PATH relative, the verb xend's era used.
t=$(ms)
if out=$(env XENBUS_PATH=$rel XENBUS_TYPE=vbd XENBUS_BASE_PATH=backend /etc/xen/scripts/block create 2>&1); then
	ok "block create (type=cow) exited 0 ($(($(ms) - t)) ms)"
else
	not_ok "block create (type=cow) exited 0" "$out" "hotplug-error: $(xenstore-read $be/hotplug-error 2>&1)"
fi
check "it reported hotplug-status=connected" sh -c "[ \"\$(xenstore-read $be/hotplug-status)\" = connected ]"
mm=$(xenstore-read $be/physical-device 2>/dev/null)
if [ -n "$mm" ] && dmsetup table -j "$((0x${mm%%:*}))" -m "$((0x${mm##*:}))" 2>/dev/null | grep -q ' snapshot '; then
	ok "block dispatched to block-cow: physical-device $mm is a dm snapshot"
else
	not_ok "block dispatched to block-cow: physical-device is a dm snapshot" "physical-device=$mm" "$(dmsetup table 2>&1)"
fi
expect_connected "xend-style block create" "$be"
if wait_console xbhxend "xvdb appeared #1 .*data=BASE-IMAGE-DATA" 60; then ok "the guest saw xvdb with the base's data"; else not_ok "the guest saw xvdb with the base's data" "$(console_log xbhxend | grep xbh-domu)"; fi

# xend's destroyDevice: online=0, state=5 (Closing); blkback closes; then the udev remove.
xenstore-write $be/online 0 $be/state 5
until_true 30 sh -c "[ \"\$(xenstore-read $be/state)\" = 6 ]" && ok "the backend closed (state 6)" || not_ok "the backend closed (state 6)" "state=$(backend_state $be)"
if out=$(env XENBUS_PATH=$rel XENBUS_TYPE=vbd XENBUS_BASE_PATH=backend /etc/xen/scripts/block destroy 2>&1); then
	ok "block destroy exited 0"
else
	not_ok "block destroy exited 0" "$out"
fi
xenstore-rm $be
xenstore-rm $fe
if wait_console xbhxend "xvdb gone #1" 60; then ok "the guest saw xvdb disappear"; else not_ok "the guest saw xvdb disappear" "$(console_log xbhxend | grep xbh-domu)"; fi
expect_nothing_left "after block destroy"
if [ "$(sha256sum <$BASE)" = "$sum0" ]; then ok "the base image is unchanged"; else not_ok "the base image is unchanged"; fi
until_true 30 domain_gone xbhxend || xl destroy xbhxend
rm -f $BASE
finish
