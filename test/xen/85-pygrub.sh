# A PV domU booted by pygrub from a block-cow disk. libxl first attaches the disk to dom0
# (frontend 0) and runs our hook for it, pygrub reads grub.cfg, the kernel and the initramfs
# through that device, libxl detaches it (our remove), and only then runs the domain's own add.
# The base image is an ext2 filesystem holding the test domU's kernel and initramfs and a
# grub.cfg whose command line is the only place the guest's mode comes from.
#   1. transient store: the guest boots from what pygrub read, the dom0 attach leaves nothing;
#   2. persistent store named after the domain: refused at the dom0 attach, with the reason;
#   3. persistent store named with store=: boots twice, the store kept in between. The first
#      guest changes grub.cfg on its disk (xbh_regrub: the next command line's xbh_marker), and
#      the second boot's pygrub follows that change: the bootloader's dom0 attach and the guest
#      see the same store, not a store of dom0's own or the bare base.
. "$XBH_PROJECT/test/xen/lib.sh"

require_hooks
IMG=/var/lib/xen/images/xbh-pygrub.img
mkdir -p /var/lib/xen/images
tree=$XBH_SCRATCH/pygrub-root
mkdir -p $tree/boot/grub
cp "$XBH_DOMU_KERNEL" $tree/boot/vmlinux
cp "$XBH_DOMU_RAMDISK" $tree/boot/initrd.cpio
cat >$tree/boot/grub/grub.cfg <<'EOF'
set default=0
set timeout=0
menuentry 'xen-blockhooks pygrub test' {
	linux /boot/vmlinux console=hvc0 quiet xbh_mode=marker xbh_marker=pyg xbh_regrub=py2 xbh_hold=1
	initrd /boot/initrd.cpio
}
EOF
if out=$(mke2fs -q -t ext2 -F -d $tree $IMG 96M 2>&1); then ok "an ext2 base image with grub.cfg, kernel and initramfs"; else not_ok "make the ext2 base image" "$out"; finish; fi
rm -rf $tree
sum0=$(sha256sum <$IMG)
HOTPLUG_LOG=/var/log/xen/xen-hotplug.log

# pygrub_cfg NAME SPEC-TAIL: a domU config with bootloader="pygrub" and no kernel of its own.
pygrub_cfg() {
	cfg=$XBH_SCRATCH/$1.cfg
	cat >"$cfg" <<EOF
name = "$1"
type = "pv"
bootloader = "pygrub"
memory = 256
vcpus = 1
on_poweroff = "destroy"
on_crash = "destroy"
disk = [ "format=raw, vdev=xvda, access=rw, script=block-cow, target=$IMG $2" ]
EOF
	echo "$cfg"
}

dom0_vbds() { xenstore-list /local/domain/0/backend/vbd/0 2>/dev/null; }

# boots NAME [MARKER]: the guest came up in the mode only grub.cfg gives it, with the marker
# (default pyg, the base image's) that grub.cfg names, on its own CoW disk, and changed that
# grub.cfg on its disk to name py2.
boots() {
	m=${2:-pyg}
	if wait_console "$1" "xbh-domu: holding" 120; then ok "$1 booted the kernel pygrub found, and wrote its disk"; else not_ok "$1 booted through pygrub" "$(console_log "$1" | tail -20)"; return 1; fi
	if console_has "$1" "booted mode=marker"; then ok "$1's command line came from the image's grub.cfg"; else not_ok "$1's command line came from grub.cfg" "$(console_log "$1" | grep xbh-domu)"; fi
	if console_has "$1" "readback=XBH:$m"; then ok "$1 read back its own marker, $m, which grub.cfg named"; else not_ok "$1 read back its marker $m" "$(console_log "$1" | grep xbh-domu)"; fi
	if console_has "$1" "regrub xbh_marker=py2"; then ok "$1 changed grub.cfg on its disk"; else not_ok "$1 changed grub.cfg on its disk" "$(console_log "$1" | grep xbh-domu)"; fi
	if [ -z "$(dom0_vbds)" ]; then ok "the bootloader's dom0 attach is gone"; else not_ok "the bootloader's dom0 attach is gone" "$(xenstore-ls -f /local/domain/0/backend/vbd/0 2>&1)"; fi
	check "one snapshot device: the guest's own" sh -c '[ "$(dmsetup table | grep -c " snapshot ")" = 1 ]'
}

# --- 1. transient store -------------------------------------------------------------------------
before=$(wc -l <$HOTPLUG_LOG 2>/dev/null || echo 0)
if xl_create "xl create xbhpyg (bootloader pygrub, block-cow transient)" "$(pygrub_cfg xbhpyg 32)"; then
	boots xbhpyg
	dom0_lines=$(tail -n +$((before + 1)) $HOTPLUG_LOG | grep 'block-cow' | grep -c 'backend/vbd/0/.*: done')
	if [ "$dom0_lines" -ge 2 ]; then ok "block-cow ran add and remove for the dom0 attach (hotplug log)"; else not_ok "block-cow ran add and remove for the dom0 attach" "$(tail -n +$((before + 1)) $HOTPLUG_LOG | grep block-cow)"; fi
	check "xl destroy xbhpyg" xl destroy xbhpyg
	expect_nothing_left "after destroying the pygrub guest"
fi

# --- 2. persistent store named after the domain: refused at the dom0 attach ---------------------
if out=$(xl create "$(pygrub_cfg xbhpyg2 '32 persistent')" 2>&1); then
	not_ok "a persistent store named after the domain is refused for the bootloader's dom0 attach" "$out"
	xl destroy xbhpyg2 2>/dev/null
else
	ok "a persistent store named after the domain is refused for the bootloader's dom0 attach"
fi
if printf '%s\n' "$out" | grep -q "attached to dom0.*store=NAME"; then ok "xl shows why, and what to write instead"; else not_ok "xl shows why the attach was refused" "$out"; fi
until_true 30 domain_gone xbhpyg2 || not_ok "the refused create left no domain" "$(xl list 2>&1)"
expect_nothing_left "after the refused create (no store made)"
# libxl leaves the nodes of a dom0 attach whose hook failed (as after any failed block-attach);
# xl block-detach takes them away (our remove finds no record and has nothing to undo).
for v in $(dom0_vbds); do
	if out=$(xl block-detach 0 "$v" 2>&1); then ok "xl block-detach 0 $v: libxl's nodes of the refused attach are gone"; else not_ok "xl block-detach 0 $v" "$out"; fi
done

# --- 3. persistent store named with store= ---------------------------------------------------------
# Boot 1's pygrub reads the base's grub.cfg (marker pyg) through a fresh store; its guest changes
# grub.cfg to name py2. Boot 2's pygrub reads grub.cfg through the dom0 attach of the same store:
# only if it is the guest's store does boot 2 come up with py2.
for n in 1 2; do
	want=pyg
	[ $n = 2 ] && want=py2
	if xl_create "xl create xbhpyg3, boot $n (persistent store=xbhpyg3.cow)" "$(pygrub_cfg xbhpyg3 '32 store=xbhpyg3.cow')"; then
		boots xbhpyg3 $want
		[ $n = 2 ] && if console_has xbhpyg3 "readback=XBH:py2"; then ok "boot 2's pygrub followed the grub.cfg boot 1's guest wrote into the named store"; else not_ok "boot 2's pygrub followed the grub.cfg boot 1's guest wrote" "$(console_log xbhpyg3 | grep xbh-domu)"; fi
		check "xl destroy xbhpyg3" xl destroy xbhpyg3
		until_true 20 sh -c '[ -z "$(dmsetup ls 2>/dev/null | grep xbh-)" ]'
		until_true 20 domain_gone xbhpyg3
		# The console log is per domain name and appended to: boot 2 is judged on its own lines.
		rm -f "$XBH_CONSOLE_LOGS/guest-xbhpyg3.log"
	fi
	if [ -f /var/lib/xen-blockhooks/xbhpyg3.cow ]; then ok "the named store is kept after boot $n"; else not_ok "the named store is kept after boot $n" "$(find /var/lib/xen-blockhooks -type f)"; fi
done
rm -f /var/lib/xen-blockhooks/xbhpyg3.cow
expect_nothing_left "after the named-store boots (store deleted by hand)"
if [ "$(sha256sum <$IMG)" = "$sum0" ]; then ok "the base image is unchanged (sha256)"; else not_ok "the base image is unchanged"; fi
rm -f $IMG
finish
