# The Debian package's nodejs trigger on this dom0, after the other scenarios ran from the
# package: reinstalling nodejs makes every hook's startup snapshot again (91 upgrades the
# package, 92 purges it; three scenarios, each within the scenario time limit under load).
. "$XBH_PROJECT/test/xen/lib.sh"

require_package
dir=$PKG_DIR

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
finish
