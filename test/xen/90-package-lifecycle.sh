# The Debian package's life on this dom0, after the other scenarios ran from it: a nodejs
# reinstall fires its trigger and every hook starts from a fresh snapshot; an upgrade to the same
# version +1 keeps the hooks and the diversion; dpkg --purge leaves nothing of ours, undoes the
# diversion, and the stock block gives a running guest a disk again. Last: it purges the hooks.
. "$XBH_PROJECT/test/xen/lib.sh"

require_hooks
case $(cat /run/xbh-hooks-installed 2>/dev/null) in
"installed with dpkg -i"*) ;;
*)
	not_ok "the hooks are installed from the Debian package" "$(cat /run/xbh-hooks-installed 2>/dev/null)"
	finish
	;;
esac
dir=$(dirname "$XBH_INSTALL")
LIB=/usr/lib/xen-blockhooks
HOOKS="block-cow block-qcow block-thin block-lvsnap block-rbd block"

# A nodejs "upgrade": reinstalling Debian's nodejs package (its /usr/bin/node is what the trigger
# watches; libnode, 47 MB, takes minutes to unpack here and moves with it). --no-triggers, then
# the package's own pending trigger: this machine's man-db index would take minutes here.
s=$LIB/block-cow.snapshot
before=$(stat -c %Y "$s" 2>/dev/null || echo 0)
sleep 1
if out=$(dpkg -i --no-triggers "$dir"/layer-debs/nodejs_*.deb 2>&1) && trig=$(dpkg --triggers-only xen-blockhooks 2>&1); then
	ok "dpkg -i nodejs (a reinstall), then xen-blockhooks' pending trigger"
	note "$(printf '%s\n' "$trig" | grep -i 'trigger\|post-install')"
else
	not_ok "dpkg -i nodejs (a reinstall), then xen-blockhooks' pending trigger" "$out" "${trig:-}"
fi
check "the trigger made block-cow's startup snapshot again" sh -c "[ \$(stat -c %Y $s) -gt $before ]"
for h in $HOOKS; do
	check "$h starts from its snapshot after the nodejs reinstall" sh -c "/etc/xen/scripts/$h --version | grep -q '(startup snapshot)'"
done

# An upgrade: the same version +1.
new=
for f in "$dir"/upgrade/xen-blockhooks_*_all.deb; do [ -f "$f" ] && new=$f; done
old=$(dpkg-query -W -f='${Version}' xen-blockhooks 2>/dev/null)
if [ -n "$new" ] && out=$(dpkg -i --no-triggers "$new" 2>&1); then
	ok "dpkg -i $(basename "$new") over version $old"
else
	not_ok "dpkg -i the package of the same version +1" "${new:-no $dir/upgrade/xen-blockhooks_*_all.deb}" "$out"
fi
check "dpkg lists the new version" sh -c "[ \"\$(dpkg-query -W -f='\${Version}' xen-blockhooks)\" = \"\$(dpkg-deb -f '$new' Version)\" ]"
check "block-cow starts from the snapshot the new postinst made" sh -c "/etc/xen/scripts/block-cow --version | grep -q '(startup snapshot)'"
check "the stock block stays diverted, our block in its place" sh -c 'dpkg-divert --listpackage /etc/xen/scripts/block | grep -qx xen-blockhooks && /etc/xen/scripts/block --version | grep -q "(xen-blockhooks)"'

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
	/lib/systemd/system/xen-blockhooks-boot.service /lib/systemd/system/xen-blockhooks-watch.service /run/xen-blockhooks; do
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
