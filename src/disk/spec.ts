/**
 * What the backend node says about the disk. Only backend-side nodes are trusted (the toolstack
 * writes them; the guest cannot): params, mode, frontend-id, dev, type, state. The domain's
 * name, used only to name devices, is read from the domain's home and reduced to safe characters.
 */
import { HotplugError } from './errors.js';
import type { XsOps } from '../xenstore/types.js';

export type Mode = 'r' | 'w';

export interface DiskSpec {
  /** The disk's target verbatim (xl `target=`, xend text after `type:`); may hold spaces and colons. */
  params: string;
  mode: Mode;
  frontendId: number | undefined;
  /** The guest's name for the disk (`xvda`, `sda1`), if the toolstack wrote one. */
  vdev: string | undefined;
  /** The backend `type` node: `phy` under xl, the disk prefix (`cow`, `file`…) under xend. */
  type: string | undefined;
  /** XenbusState of the backend when the hook started. */
  state: number | undefined;
  /** The frontend domain's name, sanitised for use in device names. */
  domainName: string | undefined;
  /**
   * The frontend domain's uuid (from its `vm` node, `/vm/<uuid>`): what a saved domain and its
   * restore have in common besides the name (src/hotplug/lifecycle.ts).
   */
  domainUuid?: string | undefined;
}

export function canonicalMode(raw: string, path: string): Mode {
  switch (raw) {
    case 'r':
    case 'ro':
      return 'r';
    case 'w':
    case 'rw':
      return 'w';
    case 'w!':
    case 'rw!':
      throw new HotplugError(
        `${path}/mode is "${raw}": the "!" mode (no sharing check) is not supported; use access=w.`,
      );
    default:
      throw new HotplugError(
        `${path}/mode is "${raw}", which is neither r nor w; set access=r or access=w on the disk.`,
      );
  }
}

/** Letters, digits, `.`, `_`, `-`; at most 48 characters (dm names are limited to 127). */
export function safeName(s: string): string {
  return s
    .replace(/[^A-Za-z0-9._-]+/g, '_')
    .replace(/^[._-]+/, '')
    .slice(0, 48);
}

export async function readDisk(xs: XsOps, path: string): Promise<DiskSpec> {
  const [params, mode, fid, dev, type, state] = await Promise.all(
    ['params', 'mode', 'frontend-id', 'dev', 'type', 'state'].map((k) => xs.tryRead(`${path}/${k}`)),
  );
  if (params === undefined || params.trim() === '') {
    throw new HotplugError(
      `${path}/params is missing or empty: the disk has no target; give the disk a target= (e.g. target=/var/lib/xen/images/base.img 64).`,
    );
  }
  if (mode === undefined)
    throw new HotplugError(`${path}/mode is missing: the toolstack did not say whether the disk is r or w.`);
  const frontendId = fid !== undefined && /^\d+$/.test(fid) ? Number(fid) : undefined;
  let domainName: string | undefined;
  let domainUuid: string | undefined;
  if (frontendId !== undefined) {
    const [n, vm] = await Promise.all([
      xs.tryRead(`/local/domain/${frontendId}/name`),
      xs.tryRead(`/local/domain/${frontendId}/vm`),
    ]);
    if (n !== undefined && safeName(n) !== '') domainName = safeName(n);
    domainUuid = uuidOfVmPath(vm);
  }
  return {
    params,
    mode: canonicalMode(mode, path),
    frontendId,
    vdev: dev !== undefined && safeName(dev) !== '' ? safeName(dev) : undefined,
    type,
    state: state !== undefined && /^\d+$/.test(state) ? Number(state) : undefined,
    domainName,
    domainUuid,
  };
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** `/vm/<uuid>` (libxl's vm path) → the uuid, lower case; anything else → undefined. */
export function uuidOfVmPath(vm: string | undefined): string | undefined {
  const u = vm
    ?.trim()
    .replace(/^\/vm\//, '')
    .toLowerCase();
  return u !== undefined && UUID.test(u) ? u : undefined;
}
