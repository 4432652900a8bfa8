/**
 * Xen's sharing check (docs/misc/block-scripts.txt: a file provided to a VM read/write is not
 * provided to any other VM), as block-common.sh's check_sharing does it, with its gaps closed:
 *
 *   - Writable to one domain means given to no other; read-only may be shared with read-only. A
 *     guest and its device-model stub domain (related through `target`) are one VM (same_vm()).
 *   - Users are found through the access devices (the block device for phy:, every loop over the
 *     same file by st_dev:st_ino for file:) and every device stacked on them (sysfs `holders`):
 *     a vbd under our backend directory whose `physical-device` names one (with the vbd's `mode`),
 *     or a mount in this domain (rw or ro). A user through a read-only loop only reads.
 *   - Request w: any user of another VM conflicts. Request r: a writing user of another VM does.
 *
 * Unlike the stock check: loop devices and physical-device values are compared as numbers (the
 * stock decimal-against-hex comparison never matches, so a second writer of a file gets through);
 * a vbd whose domain has no `vm` node counts as another VM; stacked devices are followed.
 *
 * Everything here only reads; the caller holds Xen's `block` lock around the check, the device
 * set-up and the writing of physical-device, so that no other instance decides in between.
 */
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { basename } from 'node:path';
import type { LoopInfo } from '../devices/losetup.js';
import { decodeDev, devString, fileIdKey, type FileId } from '../devices/sysfs.js';
import { HotplugError } from '../disk/errors.js';
import type { Mode } from '../disk/spec.js';
import { XsError, type XsOps } from '../xenstore/types.js';

/** A block device through which the thing asked for can be reached. */
export interface AccessDevice {
  path: string;
  major: number;
  minor: number;
  /** A read-only loop: whatever sits on it can only read. */
  readOnly: boolean;
}

export interface SharingQuery {
  /** For messages: `File /srv/a.img` or `Device /dev/vg/lv`. */
  what: string;
  /** The device itself (phy), or every loop device on the file (may be empty: nobody uses it). */
  devices: AccessDevice[];
  mode: Mode;
  /** The domain the device is for; undefined when the backend has no frontend-id. */
  frontendId: number | undefined;
  /** Our own backend path (skipped while walking the vbds). */
  self: string;
}

export interface SharingUser {
  kind: 'guest' | 'local';
  /** How it uses the device: `w` only when it can write through it. */
  mode: Mode;
  /** The access device (or the device stacked on it) it uses. */
  via: string;
  /** The device it names, `maj:min` in hex as in physical-device. */
  dev: string;
  domid?: number;
  /** The vbd's backend path (guest users). */
  backendPath?: string;
  /** The mount point (local users). */
  mountPoint?: string;
}

export interface SharingConflict extends SharingUser {
  /** The other domain's name, when it has one. */
  domainName?: string;
}

export interface SharingOptions {
  /** /proc/self/mountinfo text (tests); read from the system when absent. */
  mountinfo?: string;
  /** Root of sysfs (tests); default /sys. */
  sysfs?: string;
}

function hexDev(major: number, minor: number): string {
  return `${major.toString(16)}:${minor.toString(16)}`;
}

/** `fd:3` → [253, 3]; anything else → undefined. */
export function parsePhysicalDevice(v: string | undefined): [number, number] | undefined {
  const m = /^\s*([0-9a-fA-F]+):([0-9a-fA-F]+)\s*$/.exec(v ?? '');
  return m ? [parseInt(m[1] as string, 16), parseInt(m[2] as string, 16)] : undefined;
}

/** The xenstore mode of a vbd, as canonicalise_mode(): `w` when it contains a w, else `r`. */
function vbdMode(raw: string | undefined): Mode {
  return raw !== undefined && raw.includes('w') ? 'w' : 'r';
}

/** The directory holding every vbd of this backend domain: the backend path minus `<domid>/<devid>`. */
export function vbdBaseOf(backendPath: string): string {
  return backendPath.split('/').slice(0, -2).join('/');
}

interface Target {
  key: string;
  via: string;
  readOnly: boolean;
}

/** Every access device and every device stacked on one (transitively), keyed `maj:min` decimal. */
export function stackedDevices(devices: AccessDevice[], sysfs = '/sys'): Map<string, Target> {
  const out = new Map<string, Target>();
  const visit = (key: string, via: string, readOnly: boolean, depth: number): void => {
    const seen = out.get(key);
    if (seen && (seen.readOnly || !readOnly)) return;
    out.set(key, { key, via, readOnly });
    if (depth > 16) return;
    let holders: string[];
    try {
      holders = readdirSync(`${sysfs}/dev/block/${key}/holders`);
    } catch {
      return;
    }
    for (const h of holders) {
      try {
        const dev = readFileSync(`${sysfs}/class/block/${h}/dev`, 'utf8').trim();
        if (/^\d+:\d+$/.test(dev)) visit(dev, `/dev/${h}`, readOnly, depth + 1);
      } catch {
        // The holder went away while we looked.
      }
    }
  };
  for (const d of devices) visit(`${d.major}:${d.minor}`, d.path, d.readOnly, 0);
  return out;
}

interface Mount {
  key: string;
  mountPoint: string;
  readOnly: boolean;
}

function unescapeMount(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

/** Mounts of this domain with the block device behind each (mountinfo's st_dev, or the source's rdev). */
export function parseMountinfo(text: string, statSource: (p: string) => string | undefined): Mount[] {
  const out: Mount[] = [];
  for (const line of text.split('\n')) {
    if (!line) continue;
    const sep = line.indexOf(' - ');
    if (sep < 0) continue;
    const left = line.slice(0, sep).split(' ');
    const right = line.slice(sep + 3).split(' ');
    const mm = left[2];
    const mountPoint = unescapeMount(left[4] ?? '');
    const opts = (left[5] ?? '').split(',');
    const source = unescapeMount(right[1] ?? '');
    const superOpts = (right[2] ?? '').split(',');
    const readOnly = opts.includes('ro') || superOpts.includes('ro');
    const keys = new Set<string>();
    if (mm && /^\d+:\d+$/.test(mm) && !mm.startsWith('0:')) keys.add(mm);
    if (source.startsWith('/')) {
      const k = statSource(source);
      if (k) keys.add(k);
    }
    for (const key of keys) out.push({ key, mountPoint, readOnly });
  }
  return out;
}

function statBlock(p: string): string | undefined {
  try {
    const st = statSync(p, { bigint: true });
    if (!st.isBlockDevice()) return undefined;
    const { major, minor } = decodeDev(st.rdev);
    return `${major}:${minor}`;
  } catch {
    return undefined;
  }
}

async function listOrEmpty(xs: XsOps, path: string): Promise<string[]> {
  try {
    return await xs.directory(path);
  } catch (e) {
    if (e instanceof XsError && e.errno === 'ENOENT') return [];
    throw e;
  }
}

/** Every current user of `devices` (and what is stacked on them), in this domain and in guests. */
export async function findUsers(
  xs: XsOps,
  q: Pick<SharingQuery, 'devices' | 'self'> & {
    /**
     * The file the devices are loops of: a vbd whose params name it is a user too (before its
     * hotplug attached a loop, or when it reaches it another way, e.g. block-qcow's qemu-nbd),
     * unless its hook only reads its params' file (block-cow, block-thin).
     */
    file?: FileId;
  },
  opts: SharingOptions = {},
): Promise<SharingUser[]> {
  const targets = stackedDevices(q.devices, opts.sysfs);
  const users: SharingUser[] = [];
  if (targets.size === 0 && !q.file) return users;
  const fileKey = q.file && fileIdKey(q.file);
  const toHex = (key: string): string => {
    const [a, b] = key.split(':').map(Number) as [number, number];
    return hexDev(a, b);
  };

  let mountinfo = opts.mountinfo;
  if (mountinfo === undefined) {
    try {
      mountinfo = readFileSync('/proc/self/mountinfo', 'utf8');
    } catch {
      mountinfo = '';
    }
  }
  for (const m of parseMountinfo(mountinfo, statBlock)) {
    const t = targets.get(m.key);
    if (!t) continue;
    users.push({
      kind: 'local',
      mode: m.readOnly || t.readOnly ? 'r' : 'w',
      via: t.via,
      dev: toHex(t.key),
      mountPoint: m.mountPoint,
    });
  }

  const base = vbdBaseOf(q.self);
  const doms = await listOrEmpty(xs, base);
  const perDom = await Promise.all(doms.map(async (dom) => ({ dom, devs: await listOrEmpty(xs, `${base}/${dom}`) })));
  const vbds = perDom
    .flatMap(({ dom, devs }) => devs.map((dev) => ({ dom, path: `${base}/${dom}/${dev}` })))
    .filter((v) => v.path !== q.self);
  const pds = await Promise.all(vbds.map((v) => xs.tryRead(`${v.path}/physical-device`)));
  await Promise.all(
    vbds.map(async (v, i) => {
      const pd = parsePhysicalDevice(pds[i]);
      const t = pd && targets.get(`${pd[0]}:${pd[1]}`);
      const domid = /^\d+$/.test(v.dom) ? Number(v.dom) : undefined;
      const at = { kind: 'guest' as const, backendPath: v.path, ...(domid === undefined ? {} : { domid }) };
      if (t) {
        const mode = t.readOnly ? 'r' : vbdMode(await xs.tryRead(`${v.path}/mode`));
        users.push({ ...at, mode, via: t.via, dev: toHex(t.key) });
        return;
      }
      if (!fileKey) return;
      const [script, type, params] = await Promise.all(
        ['script', 'type', 'params'].map((k) => xs.tryRead(`${v.path}/${k}`)),
      );
      // A vbd whose params are the file itself, attached or not (a stock file: disk, block-qcow
      // serving it directly, ...), unless its hook only reads what its params name.
      if (!params?.startsWith('/') || READERS.has(basename(script ?? '')) || READER_TYPES.has(type ?? '')) return;
      if (statKey(params) !== fileKey) return;
      users.push({ ...at, mode: vbdMode(await xs.tryRead(`${v.path}/mode`)), via: params, dev: '' });
    }),
  );
  return users;
}

/** Hooks whose params name a base they only read (libxl: the script; xend: the type, its prefix). */
const READERS = new Set(['block-cow', 'block-thin']);
const READER_TYPES = new Set(['cow', 'thin']);

function statKey(p: string): string | undefined {
  try {
    const st = statSync(p, { bigint: true });
    return fileIdKey({ dev: devString(st.dev), ino: st.ino.toString() });
  } catch {
    return undefined;
  }
}

/**
 * Refuse (busy) a base image that could change under the disks built on it (`disks`, e.g.
 * `copy-on-write disks`): a writable loop on it, or a writing user of its loops or (a block
 * device) of itself: a read-write mount in this domain, or a vbd given it writable, through a
 * loop or by params naming the file (attached or not). Called under Xen's `block` lock with every
 * loop on the base.
 */
export async function refuseWritableBase(
  xs: XsOps,
  q: { hook: string; base: string; baseId: FileId; onBase: LoopInfo[]; self: string; disks: string },
  opts: SharingOptions = {},
): Promise<void> {
  const prefix = `${q.hook}: the base image ${q.base} is`;
  const writable = q.onBase.filter((l) => !l.readOnly);
  if (writable.length)
    throw new HotplugError(
      `${prefix} attached writable to ${writable.map((l) => l.name).join(', ')}; a base must not change under its ${q.disks}: detach it (losetup -d) or stop its user first.`,
      'busy',
    );
  const devices: AccessDevice[] = q.onBase.map((l) => ({
    path: l.name,
    major: l.major,
    minor: l.minor,
    readOnly: true,
  }));
  const rdev = statBlock(q.base);
  if (rdev) {
    const [major, minor] = rdev.split(':').map(Number) as [number, number];
    devices.push({ path: q.base, major, minor, readOnly: false });
  }
  const users = await findUsers(xs, { devices, self: q.self, file: q.baseId }, opts);
  const u = users
    .filter((x) => x.mode === 'w')
    .sort((a, b) => (a.backendPath ?? a.mountPoint ?? '').localeCompare(b.backendPath ?? b.mountPoint ?? ''))[0];
  if (!u) return;
  const [who, then] =
    u.kind === 'local'
      ? [`mounted read-write on ${u.mountPoint}`, 'unmount it or remount it read-only first']
      : [`given writable to ${u.backendPath}`, 'detach that disk or make it access=r first'];
  throw new HotplugError(
    `${prefix} ${who} (through ${u.via}); a base must not change under its ${q.disks}: ${then}.`,
    'busy',
  );
}

/**
 * same_vm(): two domains are the same VM when they are one domain, when their `vm` paths are
 * equal, or when one is the other's `target` (a device-model stub domain) or both have targets
 * that are the same VM. A domain without a `vm` node is not assumed to be anyone.
 */
export async function sameVm(xs: XsOps, a: number | undefined, b: number | undefined): Promise<boolean> {
  if (a === undefined || b === undefined) return false;
  if (a === b) return true;
  const num = (v: string | undefined): number | undefined =>
    v !== undefined && /^\d+$/.test(v.trim()) ? Number(v) : undefined;
  const [avm, bvm, at, bt] = await Promise.all([
    xs.tryRead(`/local/domain/${a}/vm`),
    xs.tryRead(`/local/domain/${b}/vm`),
    xs.tryRead(`/local/domain/${a}/target`).then(num),
    xs.tryRead(`/local/domain/${b}/target`).then(num),
  ]);
  if (at === b || bt === a || (at !== undefined && at === bt)) return true;
  const [atvm, btvm] = await Promise.all([
    at === undefined ? undefined : xs.tryRead(`/local/domain/${at}/vm`),
    bt === undefined ? undefined : xs.tryRead(`/local/domain/${bt}/vm`),
  ]);
  const mine = new Set([avm, atvm].filter((v): v is string => !!v));
  return [bvm, btvm].some((v) => !!v && mine.has(v));
}

/** The first user that forbids giving the device in `q.mode` to `q.frontendId`, or undefined. */
export async function findConflict(
  xs: XsOps,
  q: SharingQuery,
  opts: SharingOptions = {},
): Promise<SharingConflict | undefined> {
  const users = await findUsers(xs, q, opts);
  // Local users first (nothing to look up), then guests in a stable order.
  users.sort((x, y) =>
    x.kind === y.kind
      ? (x.backendPath ?? x.mountPoint ?? '').localeCompare(y.backendPath ?? y.mountPoint ?? '')
      : x.kind === 'local'
        ? -1
        : 1,
  );
  for (const u of users) {
    if (q.mode === 'r' && u.mode === 'r') continue;
    if (u.kind === 'guest' && (await sameVm(xs, q.frontendId, u.domid))) continue;
    if (u.kind === 'guest' && u.domid !== undefined) {
      const name = await xs.tryRead(`/local/domain/${u.domid}/name`);
      if (name) return { ...u, domainName: name };
    }
    return u;
  }
  return undefined;
}

/** The hotplug-error for a conflict: what, who has it and how, what to do. */
export function conflictMessage(q: SharingQuery, c: SharingConflict): string {
  const how = c.mode === 'w' ? 'read-write' : 'read-only';
  const wanted = q.mode === 'w' ? 'read-write' : 'read-only';
  const to = q.frontendId === undefined ? 'this domain' : `domain ${q.frontendId}`;
  if (c.kind === 'local') {
    return `${q.what} is mounted ${how} on ${c.mountPoint} in the backend domain (through ${c.via}, ${c.dev}), so it cannot be given ${wanted} to ${to}; unmount it first.`;
  }
  const who = `domain ${c.domid ?? '?'}${c.domainName ? ` (${c.domainName})` : ''}`;
  const fix = q.mode === 'w' ? 'detach it there first' : 'detach it there first, or give it read-only to both';
  return `${q.what} is already given ${how} to ${who} through ${c.via} (${c.dev}, ${c.backendPath}), so it cannot be given ${wanted} to ${to}; ${fix}.`;
}

/** Throws HotplugError(…, 'busy') naming the other user when the device may not be given. */
export async function checkSharing(xs: XsOps, q: SharingQuery, opts: SharingOptions = {}): Promise<void> {
  const c = await findConflict(xs, q, opts);
  if (c) throw new HotplugError(conflictMessage(q, c), 'busy');
}
