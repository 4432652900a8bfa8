# A running PV domU sees its disk grow and grows its filesystem online (`xen-blockhooks resize`),
# for block-cow (a transient CoW disk over a base image: the disk grows past the base with a tail
# file), the drop-in block on a raw file (truncate + losetup -c) and block-thin (the thin volume's
# length). dom0 makes an ext4 filesystem holding base.txt; the guest (xbh_mode=resize) mounts
# /dev/xvda read-write, writes guest.txt, reports its sizes and waits; dom0 runs `xen-blockhooks
# resize NAME xvda +32M` while it runs: blkback writes the new `sectors` (and says "VBD Resize" in
# dom0's kernel log), the guest's /sys/block/xvda/size grows (also for a guest that issues no I/O
# while it waits: blkback's thread looks at the size every 100 ms), `resize2fs /dev/xvda` grows
# the mounted filesystem, a file larger than the old filesystem's free space fits, both files read
# back. dom0 then checks the unmounted filesystem (e2fsck -fn, its block count is the new size),
# destroys the guest, and nothing is left; block-cow's base is unchanged, block's image is larger.
# Three guests one after the other, ~300 s after the installer at load 5, and the installer's
# ~120-160 s when this scenario is the first to need the hooks: more than the default limit.
# xbh-timeout: 900
. "$XBH_PROJECT/test/xen/lib.sh"

require_hooks
IMAGES=/var/lib/xen/images
mkdir -p $IMAGES
BASE=$IMAGES/xbh-resize-base.img
SRC=$XBH_SCRATCH/xbh-resize-src
mkdir -p $SRC
echo XBH-BASE-FILE >$SRC/base.txt
dd if=/dev/zero of=$BASE bs=1M count=32 status=none
if out=$(mkfs.ext4 -q -F -L xbhresize -d $SRC $BASE 2>&1); then
	ok "an ext4 filesystem holding base.txt on a 32 MiB base image (mkfs.ext4 -d)"
else
	not_ok "an ext4 filesystem on the base image" "$out"
	rm -f $BASE
	finish
fi
sum0=$(sha256sum <$BASE)
GROW_SECTORS=65536 # +32M

# field NAME LINE: the number after " NAME=" in LINE.
field() { printf ' %s\n' "$2" | sed -n "s/.* $1=\([0-9]*\).*/\1/p" | head -n 1; }
# The guest's line after "xbh-domu: WHAT ".
guest_line() { console_log "$1" | tr -d '\r' | sed -n "s/.*xbh-domu: $2 //p" | tail -n 1; }
guest_lines() { console_log "$1" | tr -d '\r' | grep 'xbh-domu:'; }

dev_of() { # backend → /dev/NAME of its physical-device
	mm=$(xenstore-read "$1/physical-device") || return 1
	maj=$((0x${mm%%:*}))
	min=$((0x${mm##*:}))
	name=$(sed -n 's/^DEVNAME=//p' /sys/dev/block/$maj:$min/uevent) && echo /dev/$name
}

# resize_online HOOK NAME SPEC [EXTRA]: the whole story for one disk (EXTRA: more of the guest's
# orders); returns 1 when the guest did not get as far as waiting for the new size (it is
# destroyed then).
resize_online() {
	hook=$1 name=$2 spec=$3
	cfg=$(domu_cfg "$name" resize "xbh_marker=$name xbh_hold=1 ${4:-}" "$spec")
	xl_create "$hook: xl create $name ($spec)" "$cfg" || { expect_nothing_left "$hook: after the failed create"; return 1; }
	be=$(vbd_backend "$(domid "$name")" 51712)
	expect_connected "$hook $name" "$be"
	if wait_console "$name" "xbh-domu: waiting" 120; then
		ok "$hook: $name mounted its ext4 disk read-write and wrote guest.txt"
		case ${4:-} in
		*xbh_idle=1*) if console_has "$name" "xbh-domu: waiting idle=1"; then ok "$hook: the guest waits without I/O (idle=1)"; else not_ok "$hook: the guest waits without I/O (idle=1)" "$(guest_lines "$name")"; fi ;;
		esac
	else
		not_ok "$hook: $name mounted its ext4 disk read-write and wrote guest.txt" "$(guest_lines "$name")" "$(console_log "$name" | tail -20)"
		xl destroy "$name" 2>/dev/null
		expect_nothing_left "$hook: after destroying $name"
		return 1
	fi
	before=$(guest_line "$name" before)
	s0=$(field sectors "$before")
	k0=$(field fs_kb "$before")
	want=$((s0 + GROW_SECTORS))
	case $before in
	*"base=XBH-BASE-FILE guest=XBH:$name"*) ok "$hook: the guest reads base.txt and guest.txt ($before)" ;;
	*) not_ok "$hook: the guest reads base.txt and guest.txt" "$before" ;;
	esac
	if [ -n "$s0" ] && [ "$(xenstore-read "$be/sectors" 2>&1)" = "$s0" ]; then ok "$hook: the backend announces the guest's $s0 sectors"; else not_ok "$hook: the backend announces the guest's sectors" "guest: $before" "backend sectors: $(xenstore-read "$be/sectors" 2>&1)"; fi
	vbd0=$(dmesg | grep -c 'VBD Resize: new size')

	t=$(ms)
	if out=$($CLI resize "$name" xvda +32M 2>&1); then
		ok "$hook: xen-blockhooks resize $name xvda +32M ($(($(ms) - t)) ms): $(printf '%s\n' "$out" | tail -n 1)"
	else
		not_ok "$hook: xen-blockhooks resize $name xvda +32M" "$out"
	fi
	if until_true 60 sh -c "[ \"\$(xenstore-read $be/sectors)\" = $want ]"; then
		ok "$hook: blkback announces the new size: $be/sectors = $want"
	else
		not_ok "$hook: blkback announces the new size: $be/sectors = $want" "sectors: $(xenstore-read "$be/sectors" 2>&1)" \
			"device: $(dev_of "$be") $(blockdev --getsz "$(dev_of "$be")" 2>&1) sectors" "$(dmesg | tail -n 20)"
	fi
	if [ "$(dmesg | grep -c 'VBD Resize: new size')" -gt "$vbd0" ]; then
		ok "$hook: dom0's kernel log: $(dmesg | grep 'VBD Resize: new size' | tail -n 1 | sed 's/^\[[^]]*\] //')"
	else
		not_ok "$hook: dom0's kernel log has blkback's \"VBD Resize\"" "$(dmesg | grep -i -e vbd -e blkback | tail -n 10)"
	fi
	if wait_console "$name" "xbh-domu: grown" 120; then
		grown=$(guest_line "$name" grown)
		if [ "$(field sectors "$grown")" = "$want" ]; then ok "$hook: the running guest sees /sys/block/xvda/size grow: $grown"; else not_ok "$hook: the running guest sees /sys/block/xvda/size = $want" "$grown"; fi
	else
		not_ok "$hook: the running guest sees /sys/block/xvda/size grow" "$(guest_lines "$name")"
	fi
	wait_console "$name" "xbh-domu: done" 300
	klog=$(guest_lines "$name" | grep 'kernel:' | sed 's/.*xbh-domu: kernel: //')
	if printf '%s\n' "$klog" | grep -q "Setting capacity to $want"; then
		ok "$hook: the guest's blkfront took the size from the backend: $(printf '%s\n' "$klog" | grep -e 'Setting capacity' -e 'capacity change' | sed 's/^\[[^]]*\] //' | tr '\n' ' ')"
	else
		not_ok "$hook: the guest's kernel log has blkfront's \"Setting capacity to $want\"" "$klog"
	fi
	rc=$(guest_line "$name" resize2fs | sed -n 's/^exit=//p')
	if [ "$rc" = 0 ]; then
		ok "$hook: resize2fs /dev/xvda grew the mounted filesystem online (exit 0): $(guest_lines "$name" | grep 'resize2fs: ' | sed 's/.*resize2fs: //' | tr '\n' ' ')"
	else
		not_ok "$hook: resize2fs /dev/xvda on the mounted filesystem exits 0" "$(guest_lines "$name" | grep -A 20 'grown')"
	fi
	after=$(guest_line "$name" after)
	k1=$(field fs_kb "$after")
	# 32 MiB more disk: df's size grows by that less the new groups' metadata (well above 28 MiB).
	if [ -n "$k0" ] && [ -n "$k1" ] && [ $((k1 - k0)) -ge 28672 ]; then
		ok "$hook: df in the guest: $k0 → $k1 KiB ($after)"
	else
		not_ok "$hook: df in the guest grows by at least 28 MiB" "before: $before" "after: $after"
	fi
	filled=$(guest_line "$name" filled)
	case $filled in
	*" exit=0 "*) ok "$hook: a file larger than the old filesystem's free space fits ($filled)" ;;
	*) not_ok "$hook: a file larger than the old filesystem's free space fits" "$filled" "$(guest_lines "$name" | tail -n 8)" ;;
	esac
	reread=$(guest_line "$name" reread)
	case $reread in
	*"base=XBH-BASE-FILE guest=XBH:$name"*) ok "$hook: both files still read back: $reread" ;;
	*) not_ok "$hook: both files still read back" "$reread" ;;
	esac

	if console_has "$name" "xbh-domu: unmounted"; then ok "$hook: the guest unmounted its filesystem"; else not_ok "$hook: the guest unmounted its filesystem" "$(guest_lines "$name" | tail -n 8)"; fi

	# dom0's view of the disk the guest unmounted (read-only: blkback still holds it).
	dev=$(dev_of "$be")
	if out=$(e2fsck -fn "$dev" 2>&1); then ok "$hook: e2fsck -fn $dev: the grown filesystem is clean"; else not_ok "$hook: e2fsck -fn $dev: the grown filesystem is clean" "$out"; fi
	info=$(dumpe2fs -h "$dev" 2>/dev/null)
	blocks=$(printf '%s\n' "$info" | sed -n 's/^Block count: *//p')
	bsize=$(printf '%s\n' "$info" | sed -n 's/^Block size: *//p')
	if [ -n "$blocks" ] && [ -n "$bsize" ] && [ $((blocks * bsize)) = $((want * 512)) ]; then
		ok "$hook: the filesystem spans the whole grown disk ($blocks blocks of $bsize bytes)"
	else
		not_ok "$hook: the filesystem spans the whole grown disk ($((want * 512)) bytes)" "$info"
	fi
	check "xl destroy $name" xl destroy "$name"
	if until_true 20 sh -c "! xenstore-exists $be"; then ok "$hook: the backend node is gone"; else not_ok "$hook: the backend node is gone" "$(xenstore-ls -f "$be")"; fi
	expect_nothing_left "$hook: after xl destroy $name"
}

# --- block-cow, transient ------------------------------------------------------------------------
resize_online block-cow xbhgrowcow "format=raw, vdev=xvda, access=rw, script=block-cow, target=$BASE 64"
if [ "$(sha256sum <$BASE)" = "$sum0" ]; then ok "block-cow: the base image is unchanged (sha256)"; else not_ok "block-cow: the base image is unchanged (sha256)"; fi

# --- block, a raw file ---------------------------------------------------------------------------
IMG=$IMAGES/xbh-resize-file.img
cp $BASE $IMG
# This guest issues no I/O while it waits: blkback's thread also looks at the size on its own.
resize_online block xbhgrowfile "format=raw, vdev=xvda, access=rw, script=block, target=$IMG" xbh_idle=1
size=$(stat -c %s $IMG)
if [ "$size" = $((64 << 20)) ]; then ok "block: the image file is 64 MiB after the resize"; else not_ok "block: the image file is 64 MiB after the resize" "$(ls -l $IMG)"; fi
if out=$(e2fsck -fn $IMG 2>&1); then ok "block: the image's filesystem is clean after the guest is gone"; else not_ok "block: the image's filesystem is clean after the guest is gone" "$out"; fi
rm -f $IMG

# --- block-thin, the base as external origin ----------------------------------------------------
resize_online block-thin xbhgrowthin "format=raw, vdev=xvda, access=rw, script=block-thin, target=$BASE 48"
if [ "$(sha256sum <$BASE)" = "$sum0" ]; then ok "block-thin: the base image is unchanged (sha256)"; else not_ok "block-thin: the base image is unchanged (sha256)"; fi

rm -rf $BASE $SRC
finish
