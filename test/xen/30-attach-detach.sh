# xl block-attach / block-detach to a running PV domU, once per installed hook: block-cow (a
# CoW disk over the base), block-qcow (a transient overlay on a qcow2 copy of the base), block-thin
# (a thin volume larger than the base, the base as external origin) and the
# drop-in block (the base file itself, read-only, through a loop). The guest reports each disk
# appearing (with the base's data at 4096) and disappearing; each backend must reach Connected
# and nothing may be left after each detach.
. "$XBH_PROJECT/test/xen/lib.sh"

if ! how=$(ensure_hooks); then
	skip "block-attach/block-detach to a running domU" "the hooks are not built (npm run build)"
	finish
fi
note "$how"
mkdir -p /var/lib/xen/images
BASE=/var/lib/xen/images/xbh-attach.img
make_base $BASE 32
QCOW=/var/lib/xen/images/xbh-attach.qcow2

# Each line: a hook and the disk spec xl gets for it.
specs=
if hook_installed cow; then
	specs="$specs
cow|format=raw, vdev=xvdb, access=rw, script=block-cow, target=$BASE 16"
fi
if hook_installed qcow && qemu-img convert -O qcow2 $BASE $QCOW 2>/dev/null; then
	specs="$specs
qcow|format=raw, vdev=xvdb, access=rw, script=block-qcow, target=$QCOW overlay=transient"
fi
if hook_installed thin; then
	specs="$specs
thin|format=raw, vdev=xvdb, access=rw, script=block-thin, target=$BASE 48"
fi
if hook_installed ""; then
	specs="$specs
block|format=raw, vdev=xvdb, access=ro, script=block, target=$BASE"
fi
cycles=$(printf '%s\n' "$specs" | grep -c '|')
if [ "$cycles" = 0 ]; then
	skip "block-attach/block-detach to a running domU" "no installed hook"
	finish
fi
note "hooks: $(printf '%s\n' "$specs" | cut -d'|' -f1 | tr '\n' ' ')"

cfg=$(domu_cfg xbhwatch watch "xbh_cycles=$cycles")
xl_create "xl create xbhwatch (no disks)" "$cfg" || finish
id=$(domid xbhwatch)
if wait_console xbhwatch "xbh-domu: ready" 90; then ok "xbhwatch is up"; else not_ok "xbhwatch is up" "$(console_log xbhwatch | tail -20)"; fi
be=$(vbd_backend "$id" 51728)

i=0
printf '%s\n' "$specs" | grep '|' >$XBH_SCRATCH/specs
while IFS='|' read -r hook spec; do
	i=$((i + 1))
	t=$(ms)
	if out=$(xl block-attach xbhwatch "$spec" 2>&1); then
		ok "$hook: xl block-attach returned 0 ($(($(ms) - t)) ms)"
	else
		not_ok "$hook: xl block-attach" "$out"
		expect_nothing_left "$hook: after the failed attach"
		continue
	fi
	expect_connected "$hook attach" "$be"
	if wait_console xbhwatch "xvdb appeared #$i .*data=BASE-IMAGE-DATA" 60; then
		ok "$hook: the guest saw xvdb appear with the base's data"
	else
		not_ok "$hook: the guest saw xvdb appear with the base's data" "$(console_log xbhwatch | grep xbh-domu)"
	fi
	t=$(ms)
	if out=$(xl block-detach xbhwatch xvdb 2>&1); then
		ok "$hook: xl block-detach returned 0 ($(($(ms) - t)) ms)"
	else
		not_ok "$hook: xl block-detach" "$out"
	fi
	if wait_console xbhwatch "xvdb gone #$i" 60; then ok "$hook: the guest saw xvdb disappear"; else not_ok "$hook: the guest saw xvdb disappear" "$(console_log xbhwatch | grep xbh-domu)"; fi
	if until_true 20 sh -c "! xenstore-exists $be"; then ok "$hook: the backend node is gone"; else not_ok "$hook: the backend node is gone" "$(xenstore-ls -f $be)"; fi
	expect_nothing_left "$hook: after block-detach"
done <$XBH_SCRATCH/specs

if until_true 30 domain_gone xbhwatch; then ok "xbhwatch powered off after $cycles cycles"; else not_ok "xbhwatch powered off" "$(console_log xbhwatch | tail)"; xl destroy xbhwatch; fi
rm -f $BASE $QCOW
finish
