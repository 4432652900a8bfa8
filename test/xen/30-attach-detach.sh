# xl block-attach / block-detach to a running PV domU, once per installed hook: block-cow (a
# CoW disk over the base), block-qcow (a transient overlay on a qcow2 copy of the base), block-thin
# (a thin volume larger than the base, the base as external origin) and the
# drop-in block (the base file itself, read-only, through a loop). The guest reports each disk
# appearing (with the base's data at 4096) and disappearing; each backend must reach Connected
# and nothing may be left after each detach.
. "$XBH_PROJECT/test/xen/lib.sh"

require_hooks
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
	not_ok "block-attach/block-detach to a running domU: an installed hook" "$(ls -l /etc/xen/scripts/block* 2>&1)"
	finish
fi
note "hooks: $(printf '%s\n' "$specs" | cut -d'|' -f1 | tr '\n' ' ')"

start_watcher xbhwatch "$cycles" || finish
i=0
printf '%s\n' "$specs" | grep '|' >$XBH_SCRATCH/specs
while IFS='|' read -r hook spec; do
	i=$((i + 1))
	attach_detach xbhwatch "$hook" "$spec" $i
done <$XBH_SCRATCH/specs
stop_watcher xbhwatch "$cycles"
rm -f $BASE $QCOW
finish
