#!/bin/sh
# Set up a Debian 12 machine to build, demo and test xen-blockhooks: the system packages the
# test tiers use (QEMU for the real-kernel and real-Xen guests, the device tools, Debian's
# xenstore clients, kpartx for open and fdisk's sfdisk to write the tables its tests open, groff
# for the man-page test, lintian and debootstrap for the Debian package's tests), then npm ci, the
# bundles, the test guests and the Debian 12 root the package is tried in.
# Idempotent; run as root.
set -eu
cd "$(dirname "$0")/.."

PACKAGES="qemu-system-x86 qemu-utils busybox-static cpio xz-utils kmod \
dmsetup lvm2 thin-provisioning-tools kpartx fdisk xenstore-utils util-linux fio time python3 e2fsprogs \
ceph-mon ceph-osd ceph-common groff-base lintian debootstrap"

if [ "$(id -u)" -ne 0 ]; then
	echo "setup.sh: run as root (it installs packages with apt-get)" >&2
	exit 1
fi
missing=""
for p in $PACKAGES; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
# The test tiers take Debian's kernel and Xen packages with apt-get download: lists must be there.
if [ -n "$missing" ] || [ -z "$(ls /var/lib/apt/lists/ 2>/dev/null | grep -v -e lock -e partial)" ]; then
	echo "setup.sh: apt-get update"
	apt-get update -q
fi
if [ -n "$missing" ]; then
	echo "setup.sh: installing$missing"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi
echo "setup.sh: npm ci"
npm ci --no-audit --no-fund
npm run build
# The test tiers' guests, from Debian's kernel and Xen packages (cached in .cache/; rebuilt only
# when an input changes), so the test run itself starts from finished images.
echo "setup.sh: building the test guests"
node scripts/vm/build-guest.mjs
node scripts/xen/build.mjs
# A Debian 12 root (debootstrap, cached in .cache/deb-chroot/) in which the package is installed,
# upgraded and purged with real dpkg.
node scripts/deb-chroot.mjs
