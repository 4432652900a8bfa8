# dom0 runs Debian 12's own nodejs 18.20 (the xenroot layer's /usr/bin/node over this
# machine's), Xen's own tools answer, and the project's bundles run under that node.
. "$XBH_PROJECT/test/xen/lib.sh"

v=$(node --version 2>&1)
# What a node start costs in this dom0 (kept for the other scenarios' diagnostics).
t=$(ms)
node -e 0
echo $(($(ms) - t)) >/run/xbh-node-ms
note "node -e 0 took $(cat /run/xbh-node-ms) ms"
# The oldest Node the bundles are claimed to run on (package.json's engines.node, ">=X.Y.Z").
floor=$(sed -n 's/^ *"node": ">=\([0-9.]*\)".*/\1/p' "$XBH_PROJECT/package.json")
case "$v" in
"v$floor") ok "node --version in dom0 is Debian 12's $v, the oldest Node claimed (engines.node >=$floor; $(command -v node))" ;;
*) not_ok "node --version in dom0 is v$floor, the oldest Node claimed (engines.node)" "got: $v from $(command -v node)" ;;
esac
check "/usr/bin/env node (what the hooks' #!/usr/bin/env node finds) is 18.20" sh -c '/usr/bin/env node --version | grep -q "^v18\.20\."'
check "xl info answers (the hypervisor and xenstored are up)" xl info
check "xenstore-read / answers" xenstore-read /
check "Domain-0 is listed by xl list" sh -c 'xl list | grep -q "^Domain-0 "'

# One bundle, run through its own #!/usr/bin/env node line (each node start costs seconds here).
b=
for f in "$XBH_DIST"/block-cow.mjs "$XBH_DIST"/block*.mjs; do [ -f "$f" ] && { b=$f; break; }; done
if [ -z "$b" ]; then
	not_ok "a bundled hook prints --version under Debian's node" "no dist/block*.mjs (npm run build makes them; setup.sh runs it)"
elif out=$("$b" --version 2>&1) && [ -n "$out" ]; then
	ok "$(basename "$b") --version under node $v: $out"
else
	not_ok "$(basename "$b") --version under node $v" "$out"
fi

# The package's postinst (or the installer) makes each hook a startup snapshot with this node
# (post-install); the wrapper starts from it.
require_hooks
case $(cat /run/xbh-hooks-installed 2>/dev/null) in
"installed with dpkg -i"*)
	check "dpkg lists xen-blockhooks as installed" sh -c "dpkg-query -W -f='\${Status}' xen-blockhooks | grep -qx 'install ok installed'"
	check "the stock block is diverted to block.stock by xen-blockhooks" sh -c 'dpkg-divert --listpackage /etc/xen/scripts/block | grep -qx xen-blockhooks && [ -f /etc/xen/scripts/block.stock ]'
	check "post-install recorded dom0's node for the wrappers" sh -c '[ "$(cat /usr/lib/xen-blockhooks/node)" = /usr/bin/node ]'
	;;
esac
missing=
for w in /etc/xen/scripts/block*; do
	grep -q '^# xen-blockhooks:' "$w" 2>/dev/null || continue
	s=$(sed -n "s/^s='\(.*\)'\$/\1/p" "$w")
	[ -n "$s" ] && [ -f "$s" ] && [ -f "$s.node" ] || missing="$missing $(basename "$w")"
done
if [ -z "$missing" ]; then ok "every installed hook has a startup snapshot made by node $v"; else not_ok "every installed hook has a startup snapshot" "none for:$missing" "$(cat "$XBH_SCRATCH/install.log" 2>/dev/null | grep -i snapshot)"; fi
t=$(ms)
if out=$(/etc/xen/scripts/block-cow --version 2>&1) && printf '%s' "$out" | grep -q '(startup snapshot)'; then
	ok "block-cow --version through the installed wrapper starts from its snapshot ($(($(ms) - t)) ms): $out"
else
	not_ok "block-cow --version through the installed wrapper starts from its snapshot" "$out"
fi
# A run that reaches xenstore (net) and a device tool (child_process): xl shows a hook's stderr
# to its user, so it must stay empty (Node 18's snapshot require warns about both modules).
err=$(XENBUS_PATH=backend/vbd/999/51712 XENBUS_TYPE=vbd XENBUS_BASE_PATH=backend /etc/xen/scripts/block-cow remove 2>&1 >/dev/null)
rc=$?
if [ "$rc" = 0 ] && [ -z "$err" ]; then ok "block-cow remove from its snapshot: exit 0, nothing on stderr"; else not_ok "block-cow remove from its snapshot: exit 0, nothing on stderr" "exit $rc" "$err"; fi
finish
