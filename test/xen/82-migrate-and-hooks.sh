# A migration's receiving end, and the other hooks through xl save + xl restore, with the rereading
# guest of scenario 80 (helpers in lib.sh):
#   4. the receiving end of a migration (NAME--incoming, created as xl migrate-receive creates it,
#      with the sender running on its devices) is refused a block-cow transient disk, and the
#      sender keeps reading its data;
#   5. block-qcow overlay=transient and block-thin transient: save + restore in one boot keeps the
#      data, on the same device.
. "$XBH_PROJECT/test/xen/lib.sh"

require_hooks
BASE=/var/lib/xen/images/xbh-mig.img
REREAD_BASE=$BASE
mkdir -p /var/lib/xen/images
make_base $BASE 32
sum0=$(sha256sum <$BASE)

# --- 4. a migration's receiving end, with the sender's devices live ------------------------------
# What xl migrate-receive does first on the receiving host: create the domain paused, named
# NAME--incoming, with the sender's disks. The sender (here on the same host) keeps its devices
# until the receiver has its own. A PV guest cannot really migrate here (Debian's Xen is built
# without shadow paging), so the receiver is created as migrate-receive would create it (83
# migrates a PVH guest for real).
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
QCOW=/var/lib/xen/images/xbh-mig.qcow2
for hook in qcow thin; do
	hook_installed $hook || { not_ok "block-$hook is installed"; continue; }
	case $hook in
	qcow) qemu-img convert -O qcow2 $BASE $QCOW && target=$QCOW tail="overlay=transient" ;;
	thin) target=$BASE tail=64 ;;
	esac
	save_restore_keeps xbh$hook "s$hook" $hook "$target" "$tail"
done
rm -f $QCOW

if [ "$(sha256sum <$BASE)" = "$sum0" ]; then ok "the base image is unchanged (sha256)"; else not_ok "the base image is unchanged"; fi
rm -f $BASE "$XBH_SCRATCH"/*.save
finish
