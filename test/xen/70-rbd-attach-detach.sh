# xl block-attach / block-detach of a block-rbd disk to a running PV domU, against a real
# single-node Ceph cluster started in dom0 (the recipe of test/lib/mini-ceph.ts: Debian 12's
# ceph-mon and ceph-osd, one monitor, one bluestore OSD on a loop device over a sparse file in
# /scratch, no manager, cephx off, pool size 1, 127.0.0.1 only; the rbd and libceph modules come
# from dom0's initramfs). A golden image holds the base's data, with a snapshot; `script=block-rbd,
# target=rbd/golden@base conf=…` makes the domain's transient clone rbd/xbh-xbhrbd-xvdb and maps
# it (/dev/rbdN, `-o noudev`: dom0 has no udevd). The backend reaches Connected, the guest reads
# the base's data through the clone and sees the disk go; after the detach there is no rbd
# mapping, the clone is deleted (`rbd ls` has only golden) and the golden snapshot is unchanged.
# The cluster's start-up time is in a note.
. "$XBH_PROJECT/test/xen/lib.sh"

require_hooks
for need in ceph-mon ceph-osd ceph monmaptool rbd uuidgen; do
	if ! command -v $need >/dev/null; then
		not_ok "$need is installed (scripts/setup.sh installs ceph-mon ceph-osd ceph-common)"
		finish
	fi
done
if ! hook_installed rbd; then
	not_ok "block-rbd is installed" "$(ls -l /etc/xen/scripts/block* 2>&1)"
	finish
fi
if [ ! -e /sys/bus/rbd ]; then
	not_ok "the rbd kernel module is loaded in dom0" "$(lsmod 2>&1 | grep -E 'rbd|ceph')"
	finish
fi

D=$XBH_SCRATCH/ceph
CONF=$D/ceph.conf
export CEPH_CONF=$CONF
GOLDEN=rbd/golden@base
CLONE=xbh-xbhrbd-xvdb
mkdir -p $D/mon $D/osd $D/run $D/log

# The cluster is stopped however the scenario ends (the OSD takes seconds to exit after TERM).
stop_cluster() {
	pids=
	for n in osd.0 mon.a; do
		p=$(cat $D/run/$n.pid 2>/dev/null) && [ -d /proc/$p ] && pids="$pids $p" && kill $p
	done
	for p in $pids; do
		w=0
		while [ -d /proc/$p ] && [ $w -lt 150 ]; do sleep 0.2; w=$((w + 1)); done
		[ -d /proc/$p ] && kill -9 $p
	done
	[ -n "${LOOP:-}" ] && losetup -d "$LOOP" 2>/dev/null
	LOOP=
	rm -rf $D $XBH_SCRATCH/osd.img
}
trap stop_cluster EXIT
trap 'exit 1' TERM INT

# The cluster log tails, for a failure.
ceph_logs() { for f in $D/log/mon.a.log $D/log/osd.0.log; do [ -f $f ] && echo "--- $f" && tail -15 $f; done; }

# step WHAT CMD ARG...: one start-up step, its time kept for the note; on failure: not ok, finish.
steps=
step() {
	what=$1
	shift
	s=$(ms)
	if ! out=$("$@" 2>&1); then
		not_ok "Ceph cluster in dom0: $what" "\$ $*" "$out" "$(ceph_logs)"
		finish
	fi
	steps="$steps, $what $(($(ms) - s)) ms"
}

t0=$(ms)
ip link set lo up
truncate -s 4G $XBH_SCRATCH/osd.img
step "loop for the OSD" losetup -f $XBH_SCRATCH/osd.img
LOOP=$(losetup -j $XBH_SCRATCH/osd.img | cut -d: -f1)
FSID=$(uuidgen)
OSD_UUID=$(uuidgen)
# The cluster's configuration, the same as the guest tier's (test/lib/mini-ceph.ts).
sed -e "s|@DIR@|$D|g" -e "s|@FSID@|$FSID|g" -e "s|@BLOCK@|$LOOP|g" "$XBH_PROJECT/test/lib/mini-ceph.conf" >$CONF
step "monmap" monmaptool --create --fsid "$FSID" --addv a '[v2:127.0.0.1:3300,v1:127.0.0.1:6789]' $D/monmap
step "mon mkfs" ceph-mon --mkfs -i a --monmap $D/monmap
step "mon start" ceph-mon -i a
# One start of the python CLI for both monitor commands (it costs seconds under TCG).
step "osd new + pool create (one ceph CLI)" sh -c "printf 'osd new $OSD_UUID 0\nosd pool create rbd 8 8\n' | ceph"
step "osd mkfs" ceph-osd -i 0 --mkfs --osd-uuid "$OSD_UUID"
step "osd start" ceph-osd -i 0
# Returns once the OSD is up and the pool's PGs are active.
step "rbd pool init" rbd pool init rbd
cluster_ms=$(($(ms) - t0))
ok "Ceph cluster in dom0 (1 mon, 1 bluestore OSD on $LOOP) started in $cluster_ms ms"
note "cluster start-up: ${steps#, }"
XBH_OWN_LOOPS=$LOOP

t=$(ms)
make_base $XBH_SCRATCH/base.img 16
step "golden image" rbd import --image-feature layering $XBH_SCRATCH/base.img rbd/golden
step "golden snapshot" rbd snap create $GOLDEN
rm -f $XBH_SCRATCH/base.img
golden_sum() { rbd export $GOLDEN - 2>/dev/null | sha256sum; }
sum=$(golden_sum)
ok "golden image rbd/golden with the base's data, snapshot $GOLDEN ($(($(ms) - t)) ms)"

mappings() { ls /sys/bus/rbd/devices 2>/dev/null | tr '\n' ' '; }
images() { rbd ls rbd 2>&1 | sort | tr '\n' ' '; }
while_attached() {
	m=$(rbd showmapped 2>&1)
	if printf '%s\n' "$m" | grep -q " $CLONE .*/dev/rbd"; then ok "rbd: the disk is the clone rbd/$CLONE, mapped"; else not_ok "rbd: the disk is the clone rbd/$CLONE, mapped" "$m"; fi
	p=$(rbd info rbd/$CLONE 2>&1 | grep parent:)
	case $p in *"rbd/golden@base"*) ok "rbd: the clone's parent is $GOLDEN" ;; *) not_ok "rbd: the clone's parent is $GOLDEN" "$(rbd info rbd/$CLONE 2>&1)" ;; esac
}
XBH_WHILE_ATTACHED=while_attached

start_watcher xbhrbd 1 || finish
attach_detach xbhrbd rbd "format=raw, vdev=xvdb, access=rw, script=block-rbd, target=$GOLDEN conf=$CONF" 1
if [ -z "$(mappings)" ]; then ok "rbd: after block-detach no rbd device is mapped"; else not_ok "rbd: after block-detach no rbd device is mapped" "$(rbd showmapped 2>&1)"; fi
if [ "$(images)" = "golden " ]; then ok "rbd: after block-detach the clone is deleted (rbd ls: golden)"; else not_ok "rbd: after block-detach the clone is deleted" "rbd ls: $(images)"; fi
if [ "$(golden_sum)" = "$sum" ]; then ok "rbd: the golden snapshot is unchanged"; else not_ok "rbd: the golden snapshot is unchanged"; fi
stop_watcher xbhrbd 1

# xl save + xl restore of a guest on a transient clone (docs/lifecycle.md): the mapping is held for
# the restore, the same device again, the guest's data intact; the clone goes with the destroy.
save_restore_keeps xbhrbdsave srbd rbd "$GOLDEN" "conf=$CONF"
if [ -z "$(mappings)" ] && [ "$(images)" = "golden " ]; then ok "rbd: after the restored domain's destroy no mapping and no clone is left"; else not_ok "rbd: after the restored domain's destroy no mapping and no clone is left" "mapped: $(mappings)" "rbd ls: $(images)"; fi

t=$(ms)
stop_cluster
XBH_OWN_LOOPS=
note "cluster stopped ($(($(ms) - t)) ms)"
expect_nothing_left "rbd: after stopping the cluster"
finish
