/**
 * How the hooks name what they build for a disk. Transient things are named by backend path
 * (unique while it exists); persistent things by their owner and vdev, so that the next add of
 * the same domain's disk, after a destroy, a save or a reboot, finds them again.
 *
 * The owner is the domain's name. A disk attached to dom0 (frontend-id 0: libxl's bootloader
 * attach for pygrub, or `xl block-attach 0`) has dom0 as its owner, which would name a store of
 * dom0's own and show the bootloader other data than the guest's disk: a persistent thing named
 * after its owner is refused there (`persistentOwner`); one named explicitly is found as usual.
 */
import type { DiskSpec } from '../disk/spec.js';
import { HotplugError } from '../disk/errors.js';
import { INCOMING_SUFFIX, MIGRATED_AWAY_SUFFIX } from '../disk/migration.js';

/** `backend/vbd/5/51712` (or absolute) → domid and devid. */
export function backendIds(xenbusPath: string): { domid: string; devid: string } {
  const m = /backend\/vbd3?\/(\d+)\/(\d+)$/.exec(xenbusPath);
  if (!m) throw new HotplugError(`${xenbusPath} is not a block backend path.`);
  return { domid: m[1] as string, devid: m[2] as string };
}

/**
 * The domain a name belongs to: its name without the suffix xl gives both ends of a migration
 * (`NAME--incoming` while it is received, `NAME--migratedaway` once it is sent), so that both
 * ends name the same persistent thing; then the second is refused as its user (same host) or by
 * its host's claim (shared storage), never handed a new, empty one.
 */
export function domainOwner(domainName: string | undefined): string | undefined {
  if (domainName === undefined) return undefined;
  for (const suffix of [INCOMING_SUFFIX, MIGRATED_AWAY_SUFFIX]) {
    if (domainName.endsWith(suffix) && domainName.length > suffix.length) return domainName.slice(0, -suffix.length);
  }
  return domainName;
}

/** Who the disk belongs to, for names: the domain's name (domainOwner), else d<frontend-id>. */
export function ownerName(disk: Pick<DiskSpec, 'domainName' | 'frontendId'>, domid: string): string {
  return domainOwner(disk.domainName) ?? `d${disk.frontendId ?? domid}`;
}

/**
 * The owner a persistent `what` (e.g. "copy-on-write store") is named after. Refused for a disk
 * attached to dom0, where `explicit` says how to name it instead (e.g. "store=NAME"), or is
 * undefined when the hook has no such option.
 */
export function persistentOwner(
  script: string,
  disk: Pick<DiskSpec, 'domainName' | 'frontendId'>,
  xenbusPath: string,
  what: string,
  explicit: string | undefined,
): string {
  const { domid } = backendIds(xenbusPath);
  if ((disk.frontendId ?? Number(domid)) === 0) {
    throw new HotplugError(
      `${script}: this disk is being attached to dom0 (frontend 0: a bootloader such as pygrub, or xl block-attach 0), and a persistent ${what} is named after the domain it is attached to, so dom0 would get one of its own instead of the guest's; ${explicit ? `name it explicitly with ${explicit} so that every attach finds the same one` : 'boot the domain with kernel= instead of a bootloader, or attach the disk to the guest'}.`,
    );
  }
  return ownerName(disk, domid);
}
