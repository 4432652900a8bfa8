# xl block-attach / block-detach of a block-lvsnap disk to a running PV domU: a volume group on a
# loop device in dom0, an origin LV holding the base's data, `script=block-lvsnap,
# target=VG/golden 16` (a classic snapshot with 16 MiB of copy-on-write space). The backend
# reaches Connected on the snapshot LV (tagged xbh_transient), the guest sees the base's data and
# the disk go; after the detach the snapshot LV is gone, the origin is unchanged and only the
# scenario's own VG is left; tearing that down leaves nothing.
#
# No udev in dom0: DM_DISABLE_UDEV=1 (set for every scenario, inherited by xl and the hook) makes
# LVM create its /dev nodes itself, as in the guest tier.
. "$XBH_PROJECT/test/xen/lib.sh"

require_hooks
if ! hook_installed lvsnap; then
	not_ok "block-lvsnap is installed"
	finish
fi

VG=xbhvg
ORIGIN=/dev/$VG/golden
SNAP=xbh-xbhlvsnap-xvdb
lvm() { command lvm "$@" 2>&1; }
lv_names() { command lvm lvs --noheadings -o lv_name "$VG" 2>/dev/null | tr -d ' ' | sort | tr '\n' ' '; }

t=$(ms)
truncate -s 96M $XBH_SCRATCH/pv.img
if PV=$(losetup -f --show $XBH_SCRATCH/pv.img 2>&1) &&
	out=$(lvm pvcreate -q "$PV") && out=$(lvm vgcreate -q $VG "$PV") &&
	out=$(lvm lvcreate -q -y -n golden -L 32M $VG) && [ -b $ORIGIN ]; then
	make_base $XBH_SCRATCH/base.img 32
	dd if=$XBH_SCRATCH/base.img of=$ORIGIN bs=1M conv=fsync status=none
	sum=$(sha256sum <$ORIGIN)
	ok "volume group $VG on $PV, origin LV $ORIGIN with the base's data ($(($(ms) - t)) ms)"
else
	not_ok "volume group $VG on a loop, origin LV $ORIGIN" "$PV" "$out" "$(ls -l /dev/$VG 2>&1)"
	lvm vgremove -q -f $VG >/dev/null
	[ -b "$PV" ] && losetup -d "$PV"
	finish
fi
# While the VG exists, its origin LV and the loop under it are the scenario's own.
XBH_OWN_DM="$VG-golden"
XBH_OWN_LOOPS=$PV

while_attached() {
	tags=$(command lvm lvs --noheadings -o lv_name,lv_tags,origin "$VG/$SNAP" 2>&1 | tr -s ' ')
	case $tags in
	*"$SNAP xbh_transient golden"*) ok "lvsnap: the disk is the snapshot LV $VG/$SNAP of golden, tagged xbh_transient" ;;
	*) not_ok "lvsnap: the disk is the snapshot LV $VG/$SNAP of golden, tagged xbh_transient" "lvs: $tags" "LVs: $(lv_names)" ;;
	esac
}
XBH_WHILE_ATTACHED=while_attached

start_watcher xbhlvsnap 1 || finish
attach_detach xbhlvsnap lvsnap "format=raw, vdev=xvdb, access=rw, script=block-lvsnap, target=$VG/golden 16" 1
if [ "$(lv_names)" = "golden " ]; then ok "lvsnap: after block-detach the snapshot LV is gone (LVs of $VG: golden)"; else not_ok "lvsnap: after block-detach the snapshot LV is gone" "LVs of $VG: $(lv_names)"; fi
if [ "$(sha256sum <$ORIGIN)" = "$sum" ]; then ok "lvsnap: the origin LV is unchanged"; else not_ok "lvsnap: the origin LV is unchanged"; fi
stop_watcher xbhlvsnap 1

# xl save + xl restore of a guest on a transient snapshot LV (docs/lifecycle.md): held for the
# restore, the same LV again, the guest's data intact; the LV goes with the destroy.
save_restore_keeps xbhlvsave slv lvsnap "$VG/golden" 16
if [ "$(lv_names)" = "golden " ]; then ok "lvsnap: after the restored domain's destroy the snapshot LV is gone"; else not_ok "lvsnap: after the restored domain's destroy the snapshot LV is gone" "LVs of $VG: $(lv_names)"; fi

t=$(ms)
out=$(lvm vgremove -q -f $VG; lvm pvremove -q "$PV"; losetup -d "$PV" 2>&1)
XBH_OWN_DM=
XBH_OWN_LOOPS=
rm -f $XBH_SCRATCH/pv.img $XBH_SCRATCH/base.img
note "volume group removed ($(($(ms) - t)) ms)${out:+: $out}"
expect_nothing_left "lvsnap: after removing the volume group"
finish
