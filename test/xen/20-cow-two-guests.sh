# block-cow under real xl: two PV domUs on one read-only base image, each with its own
# copy-on-write disk (`script=block-cow, target=<base> 32`). Each guest reads the base, writes
# its own marker and reads it back; dom0 checks each CoW device and store holds only its guest's
# data and the base is unchanged; `xl destroy` leaves no dm device, loop, store or record.
. "$XBH_PROJECT/test/xen/lib.sh"

require_hooks
BASE=/var/lib/xen/images/xbh-base.img
mkdir -p /var/lib/xen/images
make_base $BASE 32
sum0=$(sha256sum <$BASE)

for g in 1 2; do
	cfg=$(domu_cfg xbhcow$g marker "xbh_marker=cow$g xbh_hold=1" "format=raw, vdev=xvda, access=rw, script=block-cow, target=$BASE 32")
	xl_create "xl create xbhcow$g (block-cow over the shared base)" "$cfg" || { expect_nothing_left "after the failed create"; finish; }
done
for g in 1 2; do
	id=$(domid xbhcow$g)
	eval "be$g=$(vbd_backend "$id" 51712)"
	eval "expect_connected \"block-cow xbhcow$g\" \"\$be$g\""
done
for g in 1 2; do
	if wait_console xbhcow$g "xbh-domu: holding" 90; then ok "xbhcow$g booted and wrote its disk"; else not_ok "xbhcow$g booted and wrote its disk" "$(console_log xbhcow$g | tail -20)"; fi
	if console_has xbhcow$g "base=BASE-IMAGE-DATA"; then ok "xbhcow$g reads the base image's data through its CoW disk"; else not_ok "xbhcow$g reads the base's data" "$(console_log xbhcow$g | grep xbh-domu)"; fi
	if console_has xbhcow$g "readback=XBH:cow$g"; then ok "xbhcow$g read back its own marker"; else not_ok "xbhcow$g read back its marker" "$(console_log xbhcow$g | grep xbh-domu)"; fi
done

# dom0's view of each CoW device: its guest's marker at 0, the base's data at 4096.
dev_of() { # backend → /dev/NAME of its physical-device
	mm=$(xenstore-read "$1/physical-device") || return 1
	maj=$((0x${mm%%:*}))
	min=$((0x${mm##*:}))
	name=$(sed -n 's/^DEVNAME=//p' /sys/dev/block/$maj:$min/uevent) && echo /dev/$name
}
for g in 1 2; do
	eval "be=\$be$g"
	other=$((3 - g))
	dev=$(dev_of "$be")
	head=$(dd if="$dev" iflag=direct bs=4096 count=1 status=none | head -c 8)
	second=$(dd if="$dev" iflag=direct bs=4096 skip=1 count=1 status=none | head -c 16)
	if [ "$head" = "XBH:cow$g" ] && [ "$second" = BASE-IMAGE-DATA! ]; then
		ok "xbhcow$g's CoW device $dev holds its marker over the base's data"
	else
		not_ok "xbhcow$g's CoW device $dev holds its marker over the base's data" "at 0: $head" "at 4096: $second"
	fi
	if dd if="$dev" iflag=direct bs=1M count=32 status=none | grep -a -q "XBH:cow$other"; then
		not_ok "xbhcow$g's CoW device has none of xbhcow$other's data"
	else
		ok "xbhcow$g's CoW device has none of xbhcow$other's data"
	fi
done
stores=$(find /var/lib/xen-blockhooks -type f 2>/dev/null)
note "stores: $(echo $stores)"
for g in 1 2; do
	mine=$(grep -l -a "XBH:cow$g" $stores 2>/dev/null | wc -l)
	if [ "$mine" = 1 ]; then ok "exactly one store file holds xbhcow$g's marker"; else not_ok "exactly one store file holds xbhcow$g's marker" "found in $mine: $(grep -l -a "XBH:cow$g" $stores 2>&1)"; fi
done
if [ "$(sha256sum <$BASE)" = "$sum0" ]; then ok "the base image is unchanged (sha256)"; else not_ok "the base image is unchanged"; fi
check "dmsetup shows two snapshot devices" sh -c '[ "$(dmsetup table | grep -c " snapshot ")" = 2 ]'

for g in 1 2; do check "xl destroy xbhcow$g" xl destroy xbhcow$g; done
for g in 1 2; do
	eval "be=\$be$g"
	if until_true 20 sh -c "! xenstore-exists $be"; then ok "xbhcow$g's backend node is gone"; else not_ok "xbhcow$g's backend node is gone" "$(xenstore-ls -f $be)"; fi
done
expect_nothing_left "after xl destroy of both"
if [ "$(sha256sum <$BASE)" = "$sum0" ]; then ok "the base image is still unchanged after teardown"; else not_ok "the base image is unchanged after teardown"; fi
rm -f $BASE
finish
