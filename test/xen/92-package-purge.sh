# dpkg --purge of the Debian package on this dom0 leaves nothing of ours, undoes the diversion,
# and the stock block gives a running guest a disk again. Last: it purges the hooks.
. "$XBH_PROJECT/test/xen/lib.sh"

require_package
dir=$PKG_DIR

# Purge: nothing of ours is left (no store was left by the scenarios), the diversion is undone,
# and the stock block is xen-utils-common's own again.
stock=$XBH_SCRATCH/stock-block
dpkg-deb --fsys-tarfile "$(ls "$dir"/layer-debs/xen-utils-common_*.deb | head -n 1)" | tar -xOf - ./etc/xen/scripts/block >"$stock"
if out=$(dpkg --purge --no-triggers xen-blockhooks 2>&1); then ok "dpkg --purge xen-blockhooks"; else not_ok "dpkg --purge xen-blockhooks" "$out"; fi
rm -f /run/xbh-hooks-installed
check "dpkg knows xen-blockhooks no more" sh -c '! dpkg-query -W xen-blockhooks >/dev/null 2>&1'
check "the diversion is undone and block.stock is gone" sh -c '[ -z "$(dpkg-divert --listpackage /etc/xen/scripts/block)" ] && [ ! -e /etc/xen/scripts/block.stock ]'
check "/etc/xen/scripts/block is xen-utils-common's, unchanged" cmp "$stock" /etc/xen/scripts/block
left=
for f in $LIB /usr/sbin/xen-blockhooks /usr/sbin/xen-blockhooks-replace-block /etc/xen/blockhooks.conf /etc/logrotate.d/xen-blockhooks \
	/lib/systemd/system/xen-blockhooks-boot.service /lib/systemd/system/xen-blockhooks.service /run/xen-blockhooks; do
	[ -e "$f" ] && left="$left $f"
done
for h in $HOOKS; do [ "$h" = block ] || { [ -e /etc/xen/scripts/$h ] && left="$left /etc/xen/scripts/$h"; }; done
if [ -z "$left" ]; then ok "nothing of the package is left"; else not_ok "nothing of the package is left" "left:$left"; fi

# The stock block gives a running guest the base file again (read-only, through a loop).
mkdir -p /var/lib/xen/images
BASE=/var/lib/xen/images/xbh-stock-again.img
make_base $BASE 32
if start_watcher xbhstock 1; then
	attach_detach xbhstock "stock block" "format=raw, vdev=xvdb, access=ro, target=$BASE" 1
	stop_watcher xbhstock 1
fi
rm -f $BASE
finish
