# A bad target under real xl: a block-cow disk whose base image does not exist. xl create must
# fail, xl's output must carry the hook's hotplug-error sentence (libxl prints
# "script: <hotplug-error>"), the domain must be gone and nothing may be left behind.
. "$XBH_PROJECT/test/xen/lib.sh"

require_hooks
MISSING=/var/lib/xen/images/xbh-no-such-base.img
rm -f $MISSING
cfg=$(domu_cfg xbhbad marker "xbh_marker=bad" "format=raw, vdev=xvda, access=rw, script=block-cow, target=$MISSING 32")
if out=$(xl create "$cfg" 2>&1); then
	not_ok "xl create fails when the base image is missing" "xl create returned 0:" "$out"
else
	ok "xl create fails when the base image is missing"
fi
if printf '%s\n' "$out" | grep -q "script: .*$MISSING does not exist"; then
	ok "xl's output carries the hook's hotplug-error sentence"
	note "$(printf '%s\n' "$out" | grep "script: " | head -1)"
else
	not_ok "xl's output carries the hook's hotplug-error sentence (script: ... $MISSING does not exist)" "$out"
fi
if until_true 20 domain_gone xbhbad; then ok "the half-built domain is gone"; else not_ok "the half-built domain is gone" "$(xl list)"; xl destroy xbhbad; fi
check "no backend is left under backend/vbd" sh -c '[ -z "$(xenstore-list /local/domain/0/backend/vbd 2>/dev/null)" ]'
expect_nothing_left "after the failed create"
finish
