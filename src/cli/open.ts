/**
 * `xen-blockhooks open DOMAIN VDEV | IMAGE [--rw]` and `close`: a disk's partitions in dom0.
 *
 * open maps with kpartx (src/devices/kpartx.ts) the partitions of a domain's disk (the device its
 * journal record handed to the backend: for block-cow the snapshot, the guest's view) or of an
 * image file or block device, and prints the /dev/mapper names; close takes them away. kpartx
 * rather than `losetup -P`: the kernel never scans a dm device for partitions, and a `kpartx -r`
 * map is read-only in the kernel whatever opens it.
 *
 * Safety:
 *   - read-only by default: an image gets a read-only loop and every map is made with kpartx -r;
 *   - --rw is refused while anything else uses the disk: a guest (a vbd on the device or on
 *     anything stacked on it, or a vbd or qdisk whose params name the image), a mount in dom0, a
 *     loop someone else attached, or a journal record of the hooks naming the image: a base is
 *     never opened writable, since its copy-on-write stores depend on it;
 *   - a domain's disk is opened writable only when no domain has it any more, and never a
 *     read-only disk (for block-cow that is the base itself).
 *
 * What open builds is a journaled record of its own (script `open`, key `open/…`): close undoes
 * it; a killed open or close leaves it to `status` as orphan and to `gc --apply`; an open that
 * fails undoes itself before it reports.
 */
import { mkdirSync, readFileSync, realpathSync, statSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import type { Config } from '../config/config.js';
import { dmInfo, dmMknodes, dmRemove, dmTablesAndStatus } from '../devices/dmsetup.js';
import { kpartxAdd, partitionMapsIn, type PartitionMap } from '../devices/kpartx.js';
import { detachLoop, listLoops, loopsBacking } from '../devices/losetup.js';
import { CommandError, type Runner } from '../devices/runner.js';
import { decimalDevice, decodeDev, devString, dmDevicePath, fileIdKey, type FileId } from '../devices/sysfs.js';
import { attachLoopChecked, STEP as HOOK_STEP } from '../backends/steps.js';
import { findUsers, parseMountinfo, type AccessDevice, type SharingUser } from '../backends/sharing.js';
import { HotplugError } from '../disk/errors.js';
import {
  findStep,
  Journal,
  processAlive,
  recordStrings,
  type JournalEntry,
  type StepKind,
  type StepRecord,
} from '../journal/journal.js';
import { Build, undoAll, type UndoContext, type UndoRegistry } from '../journal/steps.js';
import { acquireFlock, withFlock, xenBlockLockPath, type HeldLock } from '../lock/flock.js';
import { lockOptions, pathLockPath } from '../lock/paths.js';
import type { Logger } from '../log/logger.js';
import type { XsOps } from '../xenstore/types.js';
import { humanBytes } from './format.js';
import type { Row } from './inventory.js';
import { vdevToDevid } from './vdev.js';

export const OPEN_HELP = `Usage: xen-blockhooks open DOMAIN VDEV [--rw]
       xen-blockhooks open IMAGE [--rw]

Map the partitions of a disk to /dev/mapper names in dom0 (kpartx), and print them, one per
line: the device, its size and how it is mapped. MBR (DOS, with logical partitions) and GPT
tables are read.

  DOMAIN VDEV  a domain's disk as the hooks built it (DOMAIN is its id or name, VDEV the guest's
               disk name, xvda): the device the backend was given. A block-cow disk shows the
               guest's view, the base image plus the guest's changes.
  IMAGE        a disk image file (attached to a loop device) or a block device.

Read-only by default: every map is read-only in the kernel (mount its file system with -o ro;
an ext4 journal that needs recovery also needs -o ro,noload). Undo with "xen-blockhooks close"
and the same arguments; "xen-blockhooks status" lists what is open (state open), and a crashed
open or close is undone by "xen-blockhooks gc --apply". Close a domain's disk before the domain
lets go of it: its hook cannot take the device away while partitions are mapped on it.

Options:
  --rw        map the partitions writable. Refused while a domain has the disk attached (for
              an image: through a loop on it or a device stacked on one, or as a disk whose
              params name it, as QEMU's qdisk backend has it), while dom0 has it mounted,
              while a loop device someone else attached is on the image, for an image a disk
              of the hooks uses (a base image shared by copy-on-write disks is never opened
              writable, nor a qcow2 image, nor a store), for a read-only disk, and when
              xenstore cannot be asked.
  -h, --help  this text

Exit status: 0 opened, 1 could not open (why is printed; nothing is left behind), 2 bad usage.`;

export const CLOSE_HELP = `Usage: xen-blockhooks close DOMAIN VDEV
       xen-blockhooks close IMAGE

Take away what "xen-blockhooks open" with the same arguments made: the partition maps, and the
loop device of an image. Refused while a partition is mounted (unmount it first).

Options:
  -h, --help  this text

Exit status: 0 closed, 1 not open or could not close (why is printed), 2 bad usage.`;

/** The journal's `script` of an open's record, and its key prefix. */
export const OPEN_SCRIPT = 'open';
const KEY_PREFIX = 'open/';

/** The steps of an open's record. */
export const OPEN_STEP = {
  xenLock: 'xen-block-lock',
  loop: 'open-loop',
  partitions: 'partitions',
} as const satisfies Record<string, StepKind>;

/** A refusal or failure of open or close: one sentence, exit 1. */
export class OpenError extends Error {
  override name = 'OpenError';
}

export function isOpenRecord(e: Pick<JournalEntry, 'script'>): boolean {
  return e.script === OPEN_SCRIPT;
}

/** What the command line names. */
export type OpenTarget = { kind: 'disk'; domain: string; vdev: string } | { kind: 'image'; path: string };

/** `DOMAIN VDEV` or `IMAGE`; throws OpenError for anything else (main turns it into usage). */
export function parseOpenTarget(args: readonly string[]): OpenTarget {
  if (args.length === 1) {
    const path = args[0] as string;
    if (path === '' || /[\0\n]/.test(path)) throw new OpenError(`"${path}" is not a path`);
    return { kind: 'image', path };
  }
  if (args.length === 2) {
    const [domain, vdev] = args as [string, string];
    vdevToDevid(vdev);
    if (domain === '') throw new OpenError('the domain is empty');
    return { kind: 'disk', domain, vdev };
  }
  throw new OpenError(`expected DOMAIN VDEV or IMAGE, not ${args.length} arguments`);
}

export interface OpenDeps {
  config: Config;
  run: Runner;
  log: Logger;
  /** Absent when xenstore cannot be reached (then --rw is refused). */
  xs: XsOps | undefined;
  journal?: Journal;
  /** /proc/self/mountinfo text (tests). */
  mountinfo?: string;
  /** The working directory a relative IMAGE is read from. */
  cwd?: string;
}

/** The device whose partitions are mapped, and how the record names what was asked for. */
interface Resolved {
  key: string;
  /** For messages: `image /srv/a.img`, `disk web/xvda (/dev/mapper/xbh-cow-web-xvda-51712)`. */
  what: string;
  /** An image file to put on a loop; absent for a block device. */
  file?: { path: string; id: FileId };
  /** The whole-disk device (a block device IMAGE, or a domain's disk). */
  device?: { path: string; major: number; minor: number };
  /** The record of the domain's disk. */
  disk?: JournalEntry;
  /** The image as given (resolved), for the record and close. */
  source: string;
}

function statRdev(path: string): { major: number; minor: number } | undefined {
  try {
    const st = statSync(path, { bigint: true });
    return st.isBlockDevice() ? decodeDev(st.rdev) : undefined;
  } catch {
    return undefined;
  }
}

function readOnlyInKernel(major: number, minor: number): boolean {
  try {
    return readFileSync(`/sys/dev/block/${major}:${minor}/ro`, 'utf8').trim() === '1';
  } catch {
    return false;
  }
}

function sectorsOf(major: number, minor: number): number | undefined {
  try {
    const s = readFileSync(`/sys/dev/block/${major}:${minor}/size`, 'utf8').trim();
    return /^\d+$/.test(s) ? Number(s) : undefined;
  } catch {
    return undefined;
  }
}

function domainMatches(e: JournalEntry, domain: string): boolean {
  if (/^\d+$/.test(domain)) {
    const m = /backend\/vbd3?\/(\d+)\/\d+$/.exec(e.backendPath);
    return (e.disk.frontendId ?? (m ? Number(m[1]) : undefined)) === Number(domain);
  }
  return e.disk.domainName === domain;
}

function keyOf(path: string): string {
  return `${KEY_PREFIX}${path.replace(/^\/+/, '')}`;
}

function resolveTarget(t: OpenTarget, journal: Journal, cwd: string): Resolved {
  if (t.kind === 'disk') {
    const hooks = journal.list().entries.filter((e) => !isOpenRecord(e));
    const matches = hooks.filter((e) => domainMatches(e, t.domain) && e.disk.vdev === t.vdev);
    if (matches.length === 0) {
      const known = hooks
        .map((e) => `${e.disk.domainName ?? e.disk.frontendId ?? '?'}/${e.disk.vdev ?? '?'}`)
        .join(', ');
      throw new OpenError(
        `no disk recorded for domain ${t.domain}, vdev ${t.vdev}${known ? ` (recorded: ${known})` : ' (the hooks have built no disk)'}`,
      );
    }
    if (matches.length > 1)
      throw new OpenError(`domain ${t.domain}, vdev ${t.vdev} matches ${matches.length} disks; give the domain id`);
    const disk = matches[0] as JournalEntry;
    if (disk.phase !== 'ready' || !disk.device)
      throw new OpenError(
        `disk ${t.domain}/${t.vdev} (${disk.backendPath}) is not built (its record is ${disk.phase}); see "xen-blockhooks status"`,
      );
    const dev = disk.device;
    const rdev = statRdev(dev.path);
    if (!rdev || rdev.major !== dev.major || rdev.minor !== dev.minor) {
      throw new OpenError(
        `disk ${t.domain}/${t.vdev}: ${dev.path} is not the device ${dev.major}:${dev.minor} its record names any more; see "xen-blockhooks status"`,
      );
    }
    return {
      key: keyOf(disk.backendPath),
      what: `disk ${t.domain}/${t.vdev} (${dev.path})`,
      device: dev,
      disk,
      source: dev.path,
    };
  }
  const given = resolve(cwd, t.path);
  let real: string;
  try {
    real = realpathSync(given);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new OpenError(
      `${t.path}: ${code === 'ENOENT' ? 'no such file' : code === 'EACCES' ? 'permission denied' : (e as Error).message}`,
    );
  }
  const st = statSync(real, { bigint: true });
  const id = { dev: devString(st.dev), ino: st.ino.toString() };
  if (st.isBlockDevice()) {
    const mm = decodeDev(st.rdev);
    return {
      key: keyOf(`dev/${decimalDevice(mm)}`),
      what: `device ${real}`,
      device: { path: real, ...mm },
      source: real,
    };
  }
  if (!st.isFile()) throw new OpenError(`${t.path} is neither a disk image file nor a block device`);
  if (st.size < 1024n) throw new OpenError(`${t.path} is ${st.size} bytes: too small to hold a partition table`);
  return { key: keyOf(`image/${fileIdKey(id)}`), what: `image ${real}`, file: { path: real, id }, source: real };
}

/** Another user of what is to be opened writable, as one sentence; undefined when there is none. */
async function rwConflict(r: Resolved, deps: OpenDeps, journal: Journal): Promise<string | undefined> {
  if (r.disk && r.disk.disk.mode !== 'w')
    return `${r.what} is a read-only disk (access=r): its device is not the guest's to change, and writing it would change what it is made from`;
  const access: AccessDevice[] = [];
  if (r.device) access.push({ path: r.device.path, major: r.device.major, minor: r.device.minor, readOnly: false });
  if (r.file) {
    const loops = await loopsBacking(deps.run, r.file.id);
    if (loops.length)
      return `${r.what} is attached to ${loops.map((l) => `${l.name}${l.readOnly ? ' (read-only)' : ''}`).join(', ')}; whoever attached it may be using it: detach it first`;
  }
  // A disk of the hooks that names the image (a base, a qcow2 image, a store): never written under it.
  if (!r.disk) {
    const idKey = r.file ? fileIdKey(r.file.id) : undefined;
    for (const e of journal.list().entries) {
      if (isOpenRecord(e)) continue;
      const strings = recordStrings(e);
      const isBase = idKey !== undefined && e.steps.some((s) => s.kind === HOOK_STEP.baseRef && s.data.key === idKey);
      if (
        isBase ||
        strings.has(r.source) ||
        (r.device && strings.has(`${r.device.major}:${r.device.minor}`)) ||
        e.disk.params.includes(r.source)
      ) {
        const who = `${e.script} disk ${e.disk.domainName ?? e.disk.frontendId ?? '?'}/${e.disk.vdev ?? '?'} (${e.backendPath})`;
        return isBase
          ? `${r.what} is the base image of ${who}; a base shared by copy-on-write disks is never opened writable`
          : `${r.what} is used by ${who}; remove that disk first`;
      }
    }
  }
  if (!deps.xs) return `xenstore cannot be reached, so it cannot be made sure that no domain has ${r.what}`;
  // A disk given to a domain without a device of dom0's in between (QEMU's qdisk backend opens
  // the file itself): its params name the image.
  const named = r.disk ? [] : await backendsNaming(deps.xs, r);
  if (named.length)
    return `${r.what} is named by the disk ${named.join(', ')}; detach it there or shut the domain down first`;
  const users: SharingUser[] = await findUsers(
    deps.xs,
    { devices: access, self: 'backend/vbd/-/-' },
    deps.mountinfo !== undefined ? { mountinfo: deps.mountinfo } : {},
  );
  const u = users[0];
  if (!u) return undefined;
  if (u.kind === 'local') return `${r.what} is mounted on ${u.mountPoint} in dom0 (through ${u.via}); unmount it first`;
  const name = u.domid !== undefined ? await deps.xs.tryRead(`/local/domain/${u.domid}/name`) : undefined;
  return `${r.what} is attached to domain ${u.domid ?? '?'}${name ? ` (${name})` : ''} (${u.backendPath}, through ${u.via}); detach it there or shut the domain down first`;
}

async function listOrNone(xs: XsOps, path: string): Promise<string[]> {
  try {
    return await xs.directory(path);
  } catch {
    return [];
  }
}

/** Backends (vbd, vbd3, qdisk) whose params name the image (the same file or device, however spelled), as `backend/qdisk/3/51712`. */
async function backendsNaming(xs: XsOps, r: Resolved): Promise<string[]> {
  const same = (p: string): boolean => {
    try {
      const st = statSync(p, { bigint: true });
      if (r.file) return devString(st.dev) === r.file.id.dev && st.ino.toString() === r.file.id.ino;
      const mm = st.isBlockDevice() ? decodeDev(st.rdev) : undefined;
      return !!mm && !!r.device && mm.major === r.device.major && mm.minor === r.device.minor;
    } catch {
      return false;
    }
  };
  const found: string[] = [];
  for (const kind of ['vbd', 'vbd3', 'qdisk']) {
    for (const dom of await listOrNone(xs, `backend/${kind}`)) {
      for (const dev of await listOrNone(xs, `backend/${kind}/${dom}`)) {
        const params = await xs.tryRead(`backend/${kind}/${dom}/${dev}/params`).catch(() => undefined);
        if (!params) continue;
        // qdisk params are FORMAT:PATH (raw:/srv/a.img); vbd params a path (or a hook's words, first the path).
        const candidates = [params, params.replace(/^[a-z0-9]+:/, ''), params.split(/\s+/)[0] ?? ''].filter((c) =>
          c.startsWith('/'),
        );
        if (candidates.some(same)) found.push(`backend/${kind}/${dom}/${dev}`);
      }
    }
  }
  return found;
}

export interface OpenedPartition {
  /** /dev/mapper/NAME (or /dev/dm-N when no node could be made). */
  path: string;
  number: number;
  bytes: number;
  readOnly: boolean;
}

export interface OpenResult {
  key: string;
  what: string;
  parent: string;
  partitions: OpenedPartition[];
}

/** The /dev/mapper node of a map: made when kpartx's libdevmapper did not (no udev). */
async function nodeOf(run: Runner, m: { name: string; major: number; minor: number }): Promise<string> {
  let path = dmDevicePath(m.name, m.minor, m.major);
  if (path !== `/dev/mapper/${m.name}`) {
    await dmMknodes(run, m.name);
    path = dmDevicePath(m.name, m.minor, m.major);
  }
  return path;
}

/** The partitions an open record holds, from its steps. */
export function recordedMaps(
  e: JournalEntry,
): { name: string; major: number; minor: number; number: number; sectors: number }[] {
  return findStep(e.steps, OPEN_STEP.partitions)?.data.maps ?? [];
}

function wrap(e: unknown): Error {
  if (e instanceof OpenError) return e;
  // A tool's failure, or a device that is not what it should be (plain Errors from src/devices):
  // the open's failure, exit 1. Anything else (a TypeError) is a bug and stays one.
  if (e instanceof HotplugError || e instanceof CommandError || (e instanceof Error && e.constructor === Error))
    return new OpenError(e.message);
  return e instanceof Error ? e : new Error(String(e));
}

export async function openTarget(t: OpenTarget, opts: { rw: boolean }, deps: OpenDeps): Promise<OpenResult> {
  const journal = deps.journal ?? new Journal(deps.config.stateDir);
  const r = resolveTarget(t, journal, deps.cwd ?? process.cwd());
  // The record is made before any lock is taken, atomically (of two opens of one disk one wins):
  // an open killed at any point after this leaves a record, whose undo (close, gc) takes the
  // locks again and so also removes the lock files a killed holder leaves.
  const entry = Journal.begin(OPEN_SCRIPT, r.key, {
    params: r.source,
    mode: opts.rw ? 'w' : 'r',
    frontendId: undefined,
    vdev: undefined,
    domainName: undefined,
    domainUuid: undefined,
  });
  if (!journal.create(entry)) {
    const had = journal.load(r.key);
    const maps = had
      ? recordedMaps(had)
          .map((m) => `/dev/mapper/${m.name}`)
          .join(', ')
      : '';
    const state = !had
      ? 'closed meanwhile'
      : had.phase === 'ready'
        ? 'open'
        : had.phase === 'failed'
          ? 'a close failed'
          : processAlive(had.pid)
            ? `being ${had.phase === 'adding' ? 'opened' : 'closed'} by process ${had.pid}`
            : `left half-way by process ${had.pid}`;
    throw new OpenError(
      `${r.what} is open already (${state}${maps ? `: ${maps}` : ''}); run "xen-blockhooks close" with the same arguments first`,
    );
  }
  let lock: HeldLock | undefined;
  try {
    const lockFile = pathLockPath(deps.config.stateDir, r.key);
    mkdirSync(dirname(lockFile), { recursive: true, mode: 0o700 });
    lock = await acquireFlock(lockFile, lockOptions(deps.config, deps.run));
    const build = new Build(entry, journal);
    const readOnly = !opts.rw;
    // Xen's block lock, as the hooks hold it around their sharing check and device set-up:
    // no hook attaches the image between the check and the maps. Written down first: its undo
    // takes it once more, which removes the lock file an open killed while holding it leaves.
    const xenLock = xenBlockLockPath(deps.config.xenLockDir);
    await build.step(OPEN_STEP.xenLock, { path: xenLock }, async () => {});
    const result = await withFlock(
      xenLock,
      async () => {
        if (opts.rw) {
          const why = await rwConflict(r, deps, journal);
          if (why) throw new OpenError(`--rw refused: ${why}.`);
        }
        let parent = r.device;
        if (r.file) {
          const f = r.file;
          const before = (await loopsBacking(deps.run, f.id)).map((l) => l.name);
          const loop = await build.step(
            OPEN_STEP.loop,
            { file: f.path, dev: f.id.dev, ino: f.id.ino, readOnly, before },
            () => attachLoopChecked(deps.run, f.path, f.id, { readOnly }),
            (l) => ({ loop: l.name, major: l.major, minor: l.minor }),
          );
          parent = { path: loop.name, major: loop.major, minor: loop.minor };
        }
        if (!parent) throw new Error('open: nothing to open');
        const p = parent;
        if (opts.rw && readOnlyInKernel(p.major, p.minor))
          throw new OpenError(`--rw refused: ${r.what} is read-only in the kernel (${p.path}).`);
        const prefix = mapPrefix(p);
        const maps = await build.step(
          OPEN_STEP.partitions,
          {
            parent: p.path,
            majmin: `${p.major}:${p.minor}`,
            prefix,
            readOnly,
            ...(r.disk
              ? {
                  disk: r.disk.backendPath,
                  domid: r.disk.disk.frontendId ?? null,
                  domain: r.disk.disk.domainName ?? null,
                  vdev: r.disk.disk.vdev ?? null,
                  hook: r.disk.script,
                }
              : { image: r.source }),
          },
          () => kpartxAdd(deps.run, p.path, { readOnly }),
          (ms: PartitionMap[]) => ({
            maps: ms.map((m) => ({
              name: m.name,
              major: m.major,
              minor: m.minor,
              number: m.number,
              sectors: m.sectors,
            })),
          }),
        );
        if (maps.length === 0) throw new OpenError(`${r.what} holds no partition table kpartx can read (MBR or GPT)`);
        const wrong = maps.filter((m) => m.parent !== `${p.major}:${p.minor}`);
        if (wrong.length)
          throw new OpenError(
            `kpartx mapped ${wrong.map((m) => m.name).join(', ')} over ${wrong[0]?.parent}, not over ${p.path}`,
          );
        const parts: OpenedPartition[] = [];
        for (const m of maps) {
          const ro = readOnlyInKernel(m.major, m.minor);
          if (readOnly && !ro)
            throw new OpenError(`${m.name} was asked for read-only (kpartx -r) but the kernel has it writable`);
          parts.push({
            path: await nodeOf(deps.run, m),
            number: m.number,
            bytes: (sectorsOf(m.major, m.minor) ?? m.sectors) * 512,
            readOnly: ro,
          });
        }
        return { key: r.key, what: r.what, parent: p.path, partitions: parts };
      },
      lockOptions(deps.config, deps.run),
    );
    entry.phase = 'ready';
    journal.save(entry);
    deps.log.info(
      `open: mapped ${result.partitions.length} partition(s) of ${r.what} ${readOnly ? 'read-only' : 'writable'}`,
      { key: r.key, partitions: result.partitions.map((x) => x.path).join(' ') },
    );
    return result;
  } catch (e) {
    const failures = await undoOpen(entry, deps, journal);
    const err = wrap(e);
    if (failures.length)
      throw new OpenError(
        `${err.message}; and undoing what was made failed: ${failures.map((f) => f.message).join('; ')} (the record ${journal.file(r.key)} is kept for "xen-blockhooks gc")`,
      );
    throw err;
  } finally {
    await lock?.release();
  }
}

/** The name kpartx gives maps of `p` before the delimiter: a dm device's name, else its kernel name. */
function mapPrefix(p: { path: string; major: number; minor: number }): string {
  try {
    const name = readFileSync(`/sys/dev/block/${p.major}:${p.minor}/dm/name`, 'utf8').trim();
    if (name) return name;
  } catch {
    // not a dm device
  }
  try {
    return realpathSync(`/sys/dev/block/${p.major}:${p.minor}`).split('/').pop() as string;
  } catch {
    return p.path.split('/').pop() as string;
  }
}

/** Find the open record for `t` (by key, or for an image that moved, by the path it was opened as). */
function findOpen(t: OpenTarget, journal: Journal, cwd: string): JournalEntry {
  const opens = journal.list().entries.filter(isOpenRecord);
  let key: string | undefined;
  let resolveError: Error | undefined;
  try {
    key = resolveTarget(t, journal, cwd).key;
  } catch (e) {
    resolveError = e as Error;
  }
  const byKey = key ? opens.find((e) => e.backendPath === key) : undefined;
  if (byKey) return byKey;
  if (t.kind === 'image') {
    const given = resolve(cwd, t.path);
    const byPath = opens.find(
      (e) =>
        e.disk.params === given ||
        e.steps.some(
          (s) =>
            (s.kind === OPEN_STEP.partitions && s.data.image === given) ||
            (s.kind === OPEN_STEP.loop && s.data.file === given),
        ),
    );
    if (byPath) return byPath;
  } else {
    const byDisk = opens.find((e) =>
      e.steps.some(
        (s) =>
          s.kind === OPEN_STEP.partitions &&
          s.data.vdev === t.vdev &&
          (String(s.data.domid) === t.domain || s.data.domain === t.domain),
      ),
    );
    if (byDisk) return byDisk;
  }
  const what = t.kind === 'disk' ? `disk ${t.domain}/${t.vdev}` : t.path;
  const list = opens.map((e) => e.disk.params).join(', ');
  throw new OpenError(
    `${what} is not open${resolveError && t.kind === 'image' ? ` (${resolveError.message})` : ''}${list ? ` (open: ${list})` : ' (nothing is open)'}`,
  );
}

export async function closeTarget(t: OpenTarget, deps: OpenDeps): Promise<{ what: string; removed: string[] }> {
  const journal = deps.journal ?? new Journal(deps.config.stateDir);
  const found = findOpen(t, journal, deps.cwd ?? process.cwd());
  const lockFile = pathLockPath(deps.config.stateDir, found.backendPath);
  mkdirSync(dirname(lockFile), { recursive: true, mode: 0o700 });
  const lock = await acquireFlock(lockFile, lockOptions(deps.config, deps.run));
  try {
    const entry = journal.load(found.backendPath);
    if (!entry) throw new OpenError(`${found.disk.params} was closed meanwhile`);
    if (entry.phase === 'adding' && entry.pid !== process.pid && processAlive(entry.pid))
      throw new OpenError(`${entry.disk.params} is being opened by process ${entry.pid} right now`);
    const removed = recordedMaps(entry).map((m) => `/dev/mapper/${m.name}`);
    const failures = await undoOpen(entry, deps, journal);
    if (failures.length)
      throw new OpenError(`closing ${entry.disk.params}: ${failures.map((f) => f.message).join('; ')}`);
    deps.log.info(`close: removed the partition maps of ${entry.disk.params}`, {
      key: entry.backendPath,
      removed: removed.join(' '),
    });
    return { what: entry.disk.params, removed };
  } finally {
    await lock.release();
  }
}

// ---------------------------------------------------------------------------------------------
// undo

function mountinfoText(): string {
  try {
    return readFileSync('/proc/self/mountinfo', 'utf8');
  } catch {
    return '';
  }
}

function statKey(p: string): string | undefined {
  const mm = statRdev(p);
  return mm ? `${mm.major}:${mm.minor}` : undefined;
}

/** Remove the partition maps: the recorded ones, or (intent only) the maps over the parent named as kpartx names them. */
async function undoPartitions(step: StepRecord<'partitions'>, ctx: UndoContext): Promise<void> {
  const { majmin, prefix, maps } = step.data;
  let names: { name: string; majmin?: string }[];
  if (maps !== undefined) {
    names = maps.map((m) => ({ name: m.name, majmin: `${m.major}:${m.minor}` }));
  } else {
    const { tables } = await dmTablesAndStatus(ctx.run);
    names = partitionMapsIn(tables, majmin, prefix).map((name) => ({ name }));
  }
  // A mounted partition is the administrator's to unmount: nothing is taken away under it.
  const keys = new Set<string>();
  const present: { name: string }[] = [];
  for (const n of names) {
    const info = await dmInfo(ctx.run, n.name);
    if (!info) continue;
    if (n.majmin && `${info.major}:${info.minor}` !== n.majmin) continue; // the name is someone else's now
    keys.add(`${info.major}:${info.minor}`);
    present.push(n);
  }
  const mounted = parseMountinfo(mountinfoText(), statKey).filter((m) => keys.has(m.key));
  if (mounted.length) {
    throw new Error(
      `a partition is mounted on ${[...new Set(mounted.map((m) => m.mountPoint))].join(', ')}; unmount it first`,
    );
  }
  for (const n of present.reverse()) await dmRemove(ctx.run, n.name, Math.max(ctx.config.busyRetryMs, 1000));
}

/** Detach the image's loop: the recorded one, or (intent only) a loop on the image that was not there before and no record names. */
async function undoOpenLoop(step: StepRecord<'open-loop'>, ctx: UndoContext): Promise<void> {
  const { file, dev, ino, loop } = step.data;
  const onFile = await loopsBacking(ctx.run, { dev, ino });
  let targets;
  if (loop !== undefined) {
    targets = onFile.filter((l) => l.name === loop);
  } else {
    const before = new Set(step.data.before);
    const named = new Set<string>();
    for (const e of ctx.journal.list().entries)
      if (e.backendPath !== ctx.entry.backendPath) for (const s of recordStrings(e)) named.add(s);
    targets = onFile.filter((l) => !before.has(l.name) && !named.has(l.name) && !named.has(`${l.major}:${l.minor}`));
  }
  for (const l of targets) await detachLoop(ctx.run, l.name);
  const left = (await listLoops(ctx.run)).filter((l) => targets.some((t) => t.name === l.name) && l.backIno === ino);
  if (left.length)
    throw new Error(
      `${left.map((l) => l.name).join(', ')} over ${file} is still open by something and goes once it is closed (autoclear set)`,
    );
}

/** Take Xen's block lock and let it go: nobody is between a check and a device set-up, and the lock file of a killed holder goes. */
async function undoXenLock(_step: StepRecord<'xen-block-lock'>, ctx: UndoContext): Promise<void> {
  await withFlock(xenBlockLockPath(ctx.config.xenLockDir), async () => {}, lockOptions(ctx.config, ctx.run));
}

/** Undo every step of an open's record (no xenstore: an open makes no vbd); the failures gathered. */
function undoOpen(entry: JournalEntry, deps: OpenDeps, journal: Journal): ReturnType<typeof undoAll> {
  return undoAll(entry, openUndo, { run: deps.run, config: deps.config, log: deps.log, journal, xs: undefined });
}

export const openUndo: UndoRegistry = {
  [OPEN_STEP.xenLock]: undoXenLock,
  [OPEN_STEP.partitions]: undoPartitions,
  [OPEN_STEP.loop]: undoOpenLoop,
};

// ---------------------------------------------------------------------------------------------
// status and gc

/**
 * The status row of an open's record. States: open (its maps are there), adding (an open is
 * running), orphan (an open or close was killed half-way: gc undoes it), failed (a close failed,
 * e.g. a partition was mounted: close again once it is not), missing (the maps are gone).
 */
export function openRow(
  e: JournalEntry,
  k: { dm: { name: string; major: number; minor: number }[] },
  alive: (pid: number) => boolean = processAlive,
): Row {
  const part = findStep(e.steps, OPEN_STEP.partitions)?.data;
  const maps = recordedMaps(e);
  const ro = e.disk.mode === 'r' ? 'read-only' : 'writable';
  const running = alive(e.pid) && e.pid !== process.pid;
  let state: string;
  let why: string;
  const list = maps.map((m) => `/dev/mapper/${m.name}`).join(', ');
  if (e.phase === 'ready') {
    const gone = maps.filter((m) => !k.dm.some((d) => d.name === m.name && d.major === m.major && d.minor === m.minor));
    state = gone.length ? 'missing' : 'open';
    why = gone.length
      ? `${gone.map((m) => m.name).join(', ')} no longer in the kernel; "xen-blockhooks close" forgets them`
      : `partitions ${list} (${ro}); "xen-blockhooks close" takes them away`;
  } else if (running) {
    state = 'adding';
    why = `process ${e.pid} is ${e.phase === 'adding' ? 'opening' : 'closing'} it`;
  } else if (e.phase === 'failed') {
    state = 'failed';
    why = `a close failed; the record was kept (${list || 'no maps'}): close again once nothing uses them`;
  } else {
    state = 'orphan';
    why = `${e.phase === 'adding' ? 'open' : 'close'} by process ${e.pid} stopped half-way (gc undoes it)`;
  }
  return {
    kind: 'record',
    entry: e,
    backendPath: e.backendPath,
    domid: part?.domid ?? undefined,
    domain: part?.domain ?? undefined,
    vdev: part?.vdev ?? undefined,
    hook: OPEN_SCRIPT,
    device: part?.parent,
    majmin: part?.majmin,
    base: part?.image ?? part?.disk ?? e.disk.params,
    store: undefined,
    usage: undefined,
    state,
    why,
  };
}

/** Whether gc may undo an open's row: only one a killed open or close left (never an open in use). */
export function gcTakesOpen(r: Row): boolean {
  return r.state === 'orphan';
}

/** Print lines for an open: the device, its size, how it is mapped. */
export function renderOpened(r: OpenResult): string[] {
  return r.partitions.map((p) => `${p.path}\t${humanBytes(p.bytes)}\t${p.readOnly ? 'read-only' : 'writable'}`);
}
