# An upgrade of the Debian package on this dom0 to the same version +1 keeps the hooks, their
# snapshots and the diversion of the stock block.
. "$XBH_PROJECT/test/xen/lib.sh"

require_package
dir=$PKG_DIR

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
finish
