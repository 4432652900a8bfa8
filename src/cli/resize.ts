/**
 * `xen-blockhooks resize DOMAIN VDEV [+]SIZE [--shrink]`: change the size a guest sees of one of
 * its disks, through its hook's resize facet, under the disk's backend-path lock. Online where
 * the hook can (a running PV guest is told by blkback: drivers/block/xen-blkback re-reads the
 * device's size and writes the new `sectors`, blkfront sets the capacity); otherwise the hook
 * says so and the size applies at the next add.
 */
import { GrowError, type ResizeResult } from '../backends/growth.js';
import { hookNamed } from '../backends/index.js';
import { deviceSectors } from '../devices/sysfs.js';
import { Journal } from '../journal/journal.js';
import { safeName, type DiskSpec } from '../disk/spec.js';
import { humanBytes } from './format.js';
import { parseGrowSize, withRecord, type GrowDeps } from './grow.js';
import { parseDisk } from './diskspec.js';
import { scriptFor } from './simulate.js';

export const RESIZE_HELP = `Usage: xen-blockhooks resize DOMAIN VDEV [+]SIZE [--shrink]
       xen-blockhooks resize DOMAIN DISKSPEC [+]SIZE

Change the size the guest sees of one disk. DOMAIN is the domain id or name, VDEV the guest's
disk name (xvda). SIZE with + is added (+1G; a bare number is MiB), without + it is the new total;
it is rounded up to whole MiB. A running PV guest sees the new size at once (blkback tells its
blkfront); grow the filesystem inside it then (resize2fs /dev/xvda).

  block         file: the image is extended (truncate) and its loop re-read (losetup -c);
                phy: a logical volume is extended (lvextend); another device: refused
  block-cow     past the base image's end: a tail file <store>.tail is mapped after the snapshot
                (the device's table is reloaded); a persistent disk comes back at its new size
  block-thin    the thin volume's virtual size (table reloaded); a persistent volume keeps it
  block-lvsnap  a thin snapshot's virtual size (lvextend); a classic snapshot is as large as
                its origin: refused
  block-qcow    not online (qemu-nbd serves a fixed size): a persistent overlay is resized
                (qemu-img resize) at its next add; a transient one is refused
  block-rbd     the clone is resized (rbd resize); the kernel's rbd device follows

A persistent disk that is not attached is named by its DOMAIN (a name) and its DISKSPEC as in
the domain's configuration (xl: 'vdev=xvda,access=w,script=block-cow,target=/srv/xen/base.img 64
persistent'; xm: 'cow:/srv/xen/base.img 64 persistent,xvda,w'): its store's tail, its thin volume's
recorded size, its qcow2 overlay or its image is resized in place, for its next add. Refused
while anything uses it, for a transient disk (it exists only while attached), and for block-lvsnap
and block-rbd (attach them, then resize).

Options:
  --shrink    allow a smaller size; only block-thin does it, and only when the guest wrote nothing
              past the new end (dm-thin reports the highest sector it mapped); the others refuse
  -h, --help  this text

Exit status: 0 resized (or recorded for the next add), 1 could not resize (why is printed),
2 bad usage.`;

/** A VDEV is a word (xvda, hda1, d0p1); a disk spec has `,`, `=` or `:`. */
export function isDiskSpec(arg: string): boolean {
  return /[,=:]/.test(arg);
}

/** A persistent disk not attached, by its spec: its hook's resizeDetached facet. */
async function resizeDetached(
  domain: string,
  spec: string,
  sizeArg: string,
  deps: GrowDeps,
  journal: Journal,
): Promise<ResizeResult> {
  const size = parseGrowSize(sizeArg);
  if (size.relative)
    throw new GrowError(
      'a disk that is not attached is given its new total size (no +): its current size is not known until its hook looks',
    );
  if (/^\d+$/.test(domain))
    throw new GrowError(`a disk that is not attached is named after its domain's name, not an id (${domain})`);
  const disk = parseDisk(spec);
  const script = scriptFor(disk);
  const backend = hookNamed(script);
  if (!backend) throw new GrowError(`${script} is not a hook of this build`);
  const attached = journal.list().entries.find((e) => e.disk.domainName === domain && e.disk.vdev === disk.vdev);
  if (attached)
    throw new GrowError(
      `${domain}/${disk.vdev} is attached (${attached.backendPath}): give its VDEV instead of its spec`,
    );
  if (!backend.resizeDetached)
    throw new GrowError(
      `${script} resizes a disk only while it is attached: attach it, then "xen-blockhooks resize ${domain} ${disk.vdev} SIZE"`,
    );
  const params = disk.syntax === 'xl' ? (disk.target ?? '') : disk.params;
  const mode = disk.mode === 'r' ? 'r' : 'w';
  // A backend path of no real domain: persistent names come from the domain's name and the vdev.
  const xenbusPath = `backend/vbd/${DETACHED_DOMID}/${disk.devid}`;
  const d: DiskSpec = {
    params,
    mode,
    vdev: disk.vdev,
    domainName: safeName(domain),
    frontendId: DETACHED_DOMID,
    type: disk.syntax === 'xm' ? disk.type : undefined,
    state: undefined,
  };
  const plan = await backend.plan(d, { config: deps.config, env: process.env, xenbusPath });
  const r = await backend.resizeDetached(plan, size.bytes, { ...deps, journal, shrink: false });
  deps.out(
    `resized ${domain}'s ${disk.vdev} (not attached): ${humanBytes(r.beforeBytes)} → ${humanBytes(r.afterBytes)} (${r.how})`,
  );
  return r;
}

/** The frontend id the plan of a detached disk is made for: never a real domain's, never dom0's. */
const DETACHED_DOMID = 2147483647;

export async function resize(
  domain: string,
  vdev: string,
  sizeArg: string,
  deps: GrowDeps,
  opts: { shrink?: boolean } = {},
): Promise<ResizeResult> {
  const journal = deps.journal ?? new Journal(deps.config.stateDir);
  if (isDiskSpec(vdev)) {
    if (opts.shrink)
      throw new GrowError('--shrink needs the disk attached (only then can its hook tell what the guest wrote)');
    return resizeDetached(domain, vdev, sizeArg, deps, journal);
  }
  const size = parseGrowSize(sizeArg);
  return withRecord(domain, vdev, deps, journal, async (fresh) => {
    if (fresh.phase !== 'ready' || !fresh.device)
      throw new GrowError(`${fresh.backendPath} is ${fresh.phase}, not ready; resize it once the add has finished`);
    const facet = hookNamed(fresh.script)?.resize;
    if (!facet)
      throw new GrowError(`resizing is not supported for ${fresh.script} (${fresh.backendPath}); nothing was changed`);
    const current = deviceSectors(deps.run, fresh.device.major, fresh.device.minor) * 512;
    const target = size.relative ? current + size.bytes : size.bytes;
    if (target < current && !opts.shrink)
      throw new GrowError(
        `${domain}/${vdev} is ${humanBytes(current)}; ${humanBytes(target)} is smaller: give --shrink to ask for a smaller disk`,
      );
    const r = await facet(fresh, target, { ...deps, journal, shrink: opts.shrink === true });
    deps.out(
      `resized ${domain}/${vdev}: ${humanBytes(r.beforeBytes)} → ${humanBytes(r.afterBytes)}, ${r.online ? 'online' : 'at its next add'} (${r.how})`,
    );
    return r;
  });
}
