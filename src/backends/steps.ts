/**
 * Steps every device-mapper backend builds with, and their undoers. Each `add*` helper journals
 * its step (through `build.step`) before doing anything, with enough data for the undoer to find
 * what it may have made after a crash; each undoer is idempotent and copes with `done: false`.
 *
 *   base-ref    a reference to a shared read-only loop over a base image, keyed by the image's
 *               dev:inode. There is no counter: the references are the journal records holding a
 *               base-ref step with that key. All base-ref work happens under the base's flock
 *               (`<stateDir>/locks/base-<dev>-<ino>`); the undoer detaches the loop only when no
 *               other record refers to the key.
 *   store-file  a file in the store directory (a copy-on-write store). Transient: deleted on undo.
 *               Persistent: kept, unless this very add created it and never finished.
 *   loop        a loop device over a store file: found again through losetup by the file's
 *               dev:inode, so an intent-only record still finds it (minus loops that another
 *               record claims: a persistent store may be in use by another disk right now).
 *   dm          a device-mapper device, by name; removal retries EBUSY for config.busyRetryMs.
 *
 * Lock order: the base lock, then Xen's `block` lock (held only around loop allocation and the
 * sharing check that must not race it).
 */
import { randomBytes } from 'node:crypto';
import {
  closeSync,
  constants as fsc,
  fstatSync,
  ftruncateSync,
  linkSync,
  lstatSync,
  mkdirSync,
  openSync,
  statfsSync,
  unlinkSync,
} from 'node:fs';
import { dirname, join } from 'node:path';
import type { Config } from '../config/config.js';
import type { Runner } from '../devices/runner.js';
import { stepsHolding, type Journal, type JournalEntry, type StepKind, type StepRecord } from '../journal/journal.js';
import type { Build, UndoContext, UndoRegistry } from '../journal/steps.js';
import { acquireFlock, withFlock, xenBlockLockPath, type HeldLock } from '../lock/flock.js';
import type { Logger } from '../log/logger.js';
import { baseImageLockPath, lockOptions } from '../lock/paths.js';
import { claimStore, releaseStore } from '../lock/store-owner.js';
import { savedClaimMarker } from '../journal/saved.js';
import { HotplugError } from '../disk/errors.js';
import type { XsOps } from '../xenstore/types.js';
import { dmCreate, dmInfo, dmRemove, type DmDevice } from '../devices/dmsetup.js';
import {
  attachLoop,
  detachLoop,
  listLoops,
  loopsBacking,
  LoopRedirected,
  type AttachOptions,
  type LoopInfo,
} from '../devices/losetup.js';
import { devString, devT, fileIdKey, type FileId } from '../devices/sysfs.js';

/** attachLoop, with a redirected open (the path changed under the check) refused as the disk's error. */
export async function attachLoopChecked(run: Runner, file: string, id: FileId, opts: AttachOptions): Promise<LoopInfo> {
  try {
    return await attachLoop(run, file, id, opts);
  } catch (e) {
    if (e instanceof LoopRedirected) throw new HotplugError(e.message);
    throw e;
  }
}

export const STEP = {
  baseRef: 'base-ref',
  storeOwner: 'store-owner',
  storeFile: 'store-file',
  loop: 'loop',
  dm: 'dm',
} as const satisfies Record<string, StepKind>;

export interface StepEnv {
  build: Build;
  run: Runner;
  config: Config;
  log: Logger;
  journal: Journal;
}

function idOf(data: { dev?: string; ino?: string }): FileId | undefined {
  return data.dev !== undefined && data.ino !== undefined ? { dev: data.dev, ino: data.ino } : undefined;
}

/** The loop a step recorded (its name and number), once its attach finished. */
export function recordedLoop(data: {
  loop?: string;
  major?: number;
  minor?: number;
}): { name: string; major: number; minor: number } | undefined {
  return data.loop !== undefined && data.major !== undefined && data.minor !== undefined
    ? { name: data.loop, major: data.major, minor: data.minor }
    : undefined;
}

// ---------------------------------------------------------------------------------------------
// base-ref

export interface BaseRefHolder {
  backendPath: string;
  loop: string | undefined;
}

/** Records other than `exceptPath` that hold a base-ref step for `key`, and records we could not read. */
export function baseRefHolders(
  journal: Journal,
  key: string,
  exceptPath: string,
): { holders: BaseRefHolder[]; unreadable: string[] } {
  const { entries, unreadable } = journal.list();
  const holders = stepsHolding(entries, STEP.baseRef, { key, counted: true }, exceptPath).map(({ entry, step }) => ({
    backendPath: entry.backendPath,
    loop: step.data.loop,
  }));
  return { holders, unreadable: unreadable.map((u) => u.file) };
}

/**
 * Take a reference on the shared read-only loop of base image `file` (identity `id`): reuse the
 * loop another record already holds, or attach one. `check` runs under Xen's `block` lock before
 * the loop is used (the sharing check); it throws to refuse.
 */
export async function addBaseRef(
  env: StepEnv,
  file: string,
  id: FileId,
  check: (loops: LoopInfo[]) => Promise<void>,
): Promise<LoopInfo> {
  const key = fileIdKey(id);
  // The step is written before the lock is taken (counted: false), so that a hook killed while it
  // waits or holds the lock still has a record whose undo takes the lock again (and so removes
  // the lock file a killed holder leaves). It counts as a reference only once `counted` is
  // written, under the lock.
  let lock: HeldLock | undefined;
  try {
    return await env.build.step(
      STEP.baseRef,
      { key, file, dev: id.dev, ino: id.ino, counted: false },
      async (note) => {
        lock = await acquireFlock(
          baseImageLockPath(env.config.stateDir, { dev: devT(id.dev), ino: BigInt(id.ino) }),
          lockOptions(env.config, env.run),
        );
        note({ counted: true });
        const { holders } = baseRefHolders(env.journal, key, env.build.entry.backendPath);
        return withFlock(
          xenBlockLockPath(env.config.xenLockDir),
          async () => {
            const onBase = await loopsBacking(env.run, id);
            await check(onBase);
            const known = new Set(holders.map((h) => h.loop).filter((l): l is string => l !== undefined));
            const shared = onBase.find((l) => known.has(l.name) && l.readOnly && l.offset === 0 && l.sizeLimit === 0);
            if (shared) {
              env.log.debug(`base ${file}: sharing ${shared.name} with ${holders.length} other disk(s)`);
              return shared;
            }
            return attachLoopChecked(env.run, file, id, { readOnly: true });
          },
          lockOptions(env.config, env.run),
        );
      },
      (l) => ({ loop: l.name, major: l.major, minor: l.minor }),
    );
  } finally {
    await lock?.release();
  }
}

/** physical-device values (hex maj:min) of vbds other than `exceptPath`, for the intent-only base-ref undo. */
async function vbdDevices(xs: XsOps | undefined): Promise<Set<string>> {
  const out = new Set<string>();
  if (!xs) return out;
  let doms: string[] = [];
  try {
    doms = await xs.directory('backend/vbd');
  } catch {
    return out;
  }
  for (const d of doms) {
    let devs: string[] = [];
    try {
      devs = await xs.directory(`backend/vbd/${d}`);
    } catch {
      continue;
    }
    for (const v of devs) {
      const pd = await xs.tryRead(`backend/vbd/${d}/${v}/physical-device`).catch(() => undefined);
      if (pd) out.add(pd.toLowerCase());
    }
  }
  return out;
}

async function undoBaseRef(step: StepRecord<'base-ref'>, ctx: UndoContext): Promise<void> {
  const { key, file, dev, ino, loop } = step.data;
  const id: FileId = { dev, ino };
  const lock = await acquireFlock(
    baseImageLockPath(ctx.config.stateDir, { dev: devT(id.dev), ino: BigInt(id.ino) }),
    lockOptions(ctx.config, ctx.run),
  );
  try {
    // Xen's lock too: losetup -d as the stock scripts do it, and a lock file left by a hook killed
    // while it held the lock is removed by this acquire/release.
    await withFlock(
      xenBlockLockPath(ctx.config.xenLockDir),
      async () => {
        if (!step.data.counted) return; // the lock was never ours: nothing was attached
        const { holders, unreadable } = baseRefHolders(ctx.journal, key, ctx.entry.backendPath);
        if (holders.length > 0) {
          ctx.log.debug(`base ${file}: ${holders.length} other disk(s) still use it; keeping its loop`);
          return;
        }
        if (unreadable.length > 0) {
          ctx.log.warn(
            `base ${file}: keeping its loop because journal records ${unreadable.join(', ')} cannot be read (they may use it)`,
          );
          return;
        }
        const onBase = (await loopsBacking(ctx.run, id)).filter((l) => l.readOnly);
        let targets: LoopInfo[];
        if (loop !== undefined) {
          targets = onBase.filter((l) => l.name === loop);
        } else {
          // Intent only: the loop may have been attached without being recorded. Take read-only loops
          // on the base that no vbd reports as its device (a stock `block` r-disk has its own loop)
          // and no other record names (the loop of an image `xen-blockhooks open` holds).
          const inUse = await vbdDevices(ctx.xs);
          const others = loopsOfOthers(ctx.journal, id, ctx.entry.backendPath);
          targets = onBase.filter(
            (l) => !inUse.has(`${l.major.toString(16)}:${l.minor.toString(16)}`) && !others.has(l.name),
          );
        }
        for (const l of targets) await detachLoop(ctx.run, l.name);
        await assertGone(ctx.run, targets, `base image ${file}`);
      },
      lockOptions(ctx.config, ctx.run),
    );
  } finally {
    await lock.release();
  }
}

async function assertGone(run: Runner, loops: LoopInfo[], what: string): Promise<void> {
  if (loops.length === 0) return;
  const names = new Set(loops.map((l) => l.name));
  const left = (await listLoops(run)).filter((l) => names.has(l.name) && l.backIno !== undefined);
  if (left.length) {
    throw new Error(
      `${left.map((l) => l.name).join(', ')} (loop of ${what}) is still open by something and stays until it is closed (autoclear set)`,
    );
  }
}

// ---------------------------------------------------------------------------------------------
// store-owner

/**
 * Claim a persistent store for this host (lock/store-owner.ts): refused, before anything is made,
 * when another host holds it. The claim is released by the undo, if it was this disk's.
 */
export async function addStoreOwner(env: StepEnv, script: string, path: string): Promise<void> {
  const backendPath = env.build.entry.backendPath;
  // Kept for a saved domain (its own restore hands the claim over before it gets here).
  const saved = savedClaimMarker(env.config, path);
  if (saved) {
    throw new HotplugError(
      `${script}: the persistent store ${path} belongs to the saved domain ${saved.name ?? saved.key} (saved ${saved.savedAt}, was ${saved.from}); its memory expects the store as it left it, so no other disk may write to it. Restore that domain (xl restore), or give it up by deleting ${saved.file}.`,
      'busy',
    );
  }
  await env.build.step(
    STEP.storeOwner,
    { path, backendPath },
    async () => claimStore(script, path, backendPath),
    (r) => ({ ours: r.ours }),
  );
}

export async function undoStoreOwner(step: StepRecord<'store-owner'>, ctx: UndoContext): Promise<void> {
  const { path, backendPath } = step.data;
  if (step.data.ours === false) return;
  // A newer step still in the record failed to go (a busy loop, a dm device, an nbd server): the
  // store is still open here, so the claim stays, and says so.
  const newer = ctx.entry.steps.slice(ctx.entry.steps.indexOf(step) + 1);
  if (newer.length > 0)
    throw new Error(
      `keeping this host's claim on ${path}: it is still in use here (${newer.map((s) => s.kind).join(', ')} not taken down)`,
    );
  // A save kept it for its domain's restore (hotplug/lifecycle.ts): its marker says so.
  const saved = savedClaimMarker(ctx.config, path);
  if (saved) {
    ctx.log.info(
      `keeping this host's claim on ${path} for the restore of saved domain ${saved.name ?? saved.key} (marker ${saved.file})`,
    );
    return;
  }
  // Intent only (done: false): the claim may have been made; releaseStore checks it names us.
  releaseStore(path, backendPath);
}

// ---------------------------------------------------------------------------------------------
// store-file

export interface StoreFileResult {
  existed: boolean;
  dev: string;
  ino: string;
}

/** A store directory we may write in: create it 0700, refuse one that others could write into. */
export function ensureStoreDir(dir: string): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const st = lstatSync(dir);
  if (!st.isDirectory())
    throw new HotplugError(`the store directory ${dir} is not a directory; fix store_dir in /etc/xen/blockhooks.conf.`);
  if ((st.mode & 0o022) !== 0)
    throw new HotplugError(
      `the store directory ${dir} is writable by group or others (mode ${(st.mode & 0o777).toString(8)}); run chmod 700 ${dir}.`,
    );
  if (typeof process.getuid === 'function' && st.uid !== process.getuid())
    throw new HotplugError(`the store directory ${dir} is owned by uid ${st.uid}, not by us; chown it to root.`);
}

/**
 * Free space below which no disk starts on a store directory. Stores are sparse, so creating one
 * never fails on a full filesystem: dm-snapshot's header write would, with an I/O error naming no
 * cause, or the guest's first writes would, making the snapshot Invalid under it. 1 MiB holds
 * the header and the first exception chunks; growth after that is the watcher's business.
 */
export const MIN_STORE_FREE_BYTES = 1024 * 1024;

/**
 * Refuse a store directory whose filesystem is (nearly) full, with the numbers. A directory not
 * made yet is judged by the filesystem it will be made on (its nearest existing parent).
 */
export function checkStoreSpace(dir: string, minFree: number = MIN_STORE_FREE_BYTES): void {
  let st;
  for (let d = dir; ; d = dirname(d)) {
    try {
      st = statfsSync(d, { bigint: true });
      break;
    } catch {
      if (dirname(d) === d) return; // the directory's own checks and the store's creation report what is wrong
    }
  }
  const free = st.bavail * st.bsize;
  if (free < BigInt(minFree)) {
    const kib = (n: bigint) => `${(n / 1024n).toString()} KiB`;
    throw new HotplugError(
      `the store directory ${dir} has only ${kib(free)} free of ${kib(st.blocks * st.bsize)} (its filesystem is full); a copy-on-write store needs at least ${kib(BigInt(minFree))} to start. Free space there, or move store_dir in /etc/xen/blockhooks.conf.`,
    );
  }
}

function fidOfStats(st: { dev: bigint; ino: bigint }): FileId {
  return { dev: devString(st.dev), ino: st.ino.toString() };
}

/**
 * A sparse store of `bytes` at `path`, mode 0600, never following a symlink. Transient: created
 * O_EXCL. Persistent: reused when it exists (a regular file), else created under a temporary name
 * and linked into place (link(2) fails if someone else got there first), so an undo never deletes
 * a store it did not make.
 */
export async function addStoreFile(
  env: StepEnv,
  path: string,
  bytes: number,
  persistent: boolean,
): Promise<StoreFileResult> {
  const tmp = persistent ? join(path, '..', `.${path.replace(/^.*\//, '')}.${process.pid}.new`) : undefined;
  return env.build.step(
    STEP.storeFile,
    { path, persistent, ...(tmp ? { tmp } : {}) },
    async () => {
      if (persistent) {
        const existing = openExisting(path);
        if (existing) return { existed: true, ...existing };
        const made = createSparse(tmp as string, bytes);
        try {
          linkSync(tmp as string, path);
        } catch (e) {
          unlinkSync(tmp as string);
          if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
          const other = openExisting(path);
          if (!other) throw new Error(`store ${path} appeared and vanished while it was being created`);
          return { existed: true, ...other };
        }
        unlinkSync(tmp as string);
        return { existed: false, ...made };
      }
      return { existed: false, ...createSparse(path, bytes) };
    },
    (r) => ({ existed: r.existed, dev: r.dev, ino: r.ino }),
  );
}

function createSparse(path: string, bytes: number): FileId {
  const fd = openSync(path, fsc.O_RDWR | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600);
  try {
    ftruncateSync(fd, bytes);
    return fidOfStats(fstatSync(fd, { bigint: true }));
  } finally {
    closeSync(fd);
  }
}

function openExisting(path: string): FileId | undefined {
  let fd: number;
  try {
    fd = openSync(path, fsc.O_RDWR | fsc.O_NOFOLLOW);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return undefined;
    if (code === 'ELOOP')
      throw new HotplugError(
        `the store ${path} is a symbolic link; stores must be plain files in the store directory.`,
      );
    throw e;
  }
  try {
    const st = fstatSync(fd, { bigint: true });
    if (!st.isFile())
      throw new HotplugError(`the store ${path} is not a regular file; move it away or choose another store= name.`);
    return fidOfStats(st);
  } finally {
    closeSync(fd);
  }
}

function statId(path: string): FileId | undefined {
  try {
    return fidOfStats(lstatSync(path, { bigint: true }));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
}

async function unlinkUnattached(run: Runner, path: string, expect: FileId | undefined): Promise<void> {
  const id = statId(path);
  if (!id) return;
  if (expect && fileIdKey(expect) !== fileIdKey(id)) return; // another file by now: not ours
  const loops = await loopsBacking(run, id);
  if (loops.length)
    throw new Error(`store ${path} is still attached to ${loops.map((l) => l.name).join(', ')}; not deleting it`);
  unlinkSync(path);
}

async function undoStoreFile(step: StepRecord<'store-file'>, ctx: UndoContext): Promise<void> {
  const { path, tmp } = step.data;
  const recorded = idOf(step.data);
  if (!step.data.persistent) {
    // Transient stores are unique to their disk: whatever is at the path is this disk's.
    await unlinkUnattached(ctx.run, path, step.done ? recorded : undefined);
    return;
  }
  if (tmp !== undefined) {
    const t = statId(tmp);
    if (t) {
      const p = statId(path);
      if (p && fileIdKey(p) === fileIdKey(t)) await unlinkUnattached(ctx.run, path, t);
      unlinkSync(tmp);
    }
  }
  // A persistent store made by an add that never finished holds nothing of value.
  if (step.done && step.data.existed === false && ctx.entry.device === undefined && recorded)
    await unlinkUnattached(ctx.run, path, recorded);
}

// ---------------------------------------------------------------------------------------------
// loop

/** Attach a loop over `file` (unique to this disk), under Xen's `block` lock; `check` runs first, under it. */
export async function addLoop(
  env: StepEnv,
  file: string,
  id: FileId,
  opts: { readOnly: boolean },
  check?: (loops: LoopInfo[]) => Promise<void>,
): Promise<LoopInfo> {
  return env.build.step(
    STEP.loop,
    { file, dev: id.dev, ino: id.ino, readOnly: opts.readOnly },
    () =>
      withFlock(
        xenBlockLockPath(env.config.xenLockDir),
        async () => {
          if (check) await check(await loopsBacking(env.run, id));
          return attachLoopChecked(env.run, file, id, opts);
        },
        lockOptions(env.config, env.run),
      ),
    (l) => ({ loop: l.name, major: l.major, minor: l.minor }),
  );
}

/**
 * Loop devices other records say they made over file `id`, by any step that names the file's
 * dev:inode and a loop (a persistent store's current user, a base's shared loop, the loop of an
 * image `xen-blockhooks open` holds): never an intent-only undo's to take.
 */
function loopsOfOthers(journal: Journal, id: FileId, exceptPath: string): Set<string> {
  const out = new Set<string>();
  for (const e of journal.list().entries) {
    if (e.backendPath === exceptPath) continue;
    for (const s of e.steps) {
      if (s.kind !== STEP.baseRef && s.kind !== STEP.loop && s.kind !== 'open-loop') continue;
      if (s.data.dev === id.dev && s.data.ino === id.ino && s.data.loop !== undefined) out.add(s.data.loop);
    }
  }
  return out;
}

async function undoLoop(step: StepRecord<'loop'>, ctx: UndoContext): Promise<void> {
  const { file, dev, ino, loop } = step.data;
  const id: FileId = { dev, ino };
  const onFile = await loopsBacking(ctx.run, id);
  // Ours: the loop recorded, or (intent only) any loop on the file that no other record claims.
  const others = loop !== undefined ? new Set<string>() : loopsOfOthers(ctx.journal, id, ctx.entry.backendPath);
  const loops = onFile.filter((l) => (loop !== undefined ? l.name === loop : !others.has(l.name)));
  for (const l of loops) await detachLoop(ctx.run, l.name);
  await assertGone(ctx.run, loops, file);
}

// ---------------------------------------------------------------------------------------------
// dm

/**
 * A dm device made for this record, with a dm uuid of its own (recorded before the create), so
 * that an undo of a step that never finished removes the device only when it carries that uuid:
 * a device of the same name may be another disk's (one held for a saved domain of that name).
 */
export async function addDm(
  env: StepEnv,
  name: string,
  table: string,
  opts: { readOnly?: boolean; uuid?: string } = {},
): Promise<DmDevice> {
  const uuid = opts.uuid ?? `XBH-${randomBytes(12).toString('hex')}`;
  return env.build.step(
    STEP.dm,
    { name, table, uuid, readOnly: opts.readOnly === true },
    async () => {
      try {
        return await dmCreate(env.run, name, table, { ...opts, uuid });
      } catch (e) {
        const other = await dmInfo(env.run, name).catch(() => undefined);
        if (other && other.uuid !== uuid) {
          throw new HotplugError(
            `a device-mapper device named ${name} exists already (${other.major}:${other.minor}): another disk of a domain of this name, or one held for its saved domain (see "xen-blockhooks status"); nothing was built. Remove that disk or restore that domain first.`,
            'busy',
          );
        }
        throw e;
      }
    },
    (d) => ({ major: d.major, minor: d.minor }),
  );
}

async function undoDm(step: StepRecord<'dm'>, ctx: UndoContext): Promise<void> {
  const { name, uuid } = step.data;
  if (!step.done && uuid !== undefined) {
    // Intent only: the create may not have happened, and the name may be another disk's.
    const info = await dmInfo(ctx.run, name);
    if (!info || info.uuid !== uuid) return;
  }
  await dmRemove(ctx.run, name, ctx.config.busyRetryMs);
}

/** The undoers of this file, for a backend's `undo` registry. */
export const sharedUndo: UndoRegistry = {
  [STEP.baseRef]: undoBaseRef,
  [STEP.storeOwner]: undoStoreOwner,
  [STEP.storeFile]: undoStoreFile,
  [STEP.loop]: undoLoop,
  [STEP.dm]: undoDm,
};

export type { JournalEntry };
