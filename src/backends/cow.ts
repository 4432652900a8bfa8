/**
 * block-cow: LiveCD-style copy-on-write disks on device-mapper.
 *
 *   mode w:  base image ──losetup -r (shared by every disk on that image)──┐
 *            sparse store (0600, store dir) ──losetup──────────────────────┴─ dm snapshot N|P ─→ guest
 *   mode r:  base image ──losetup -r (shared)── dm linear, read-only ─→ guest
 *
 * plan() checks the params and the base image and touches nothing; add() builds with the shared
 * steps of steps.ts (each journaled before it runs); remove is the runtime's undo of the journal.
 * See docs/block-cow.md for the grammar, names and sharing rules.
 */
import {
  closeSync,
  constants as fsc,
  existsSync,
  lstatSync,
  openSync,
  statSync,
  truncateSync,
  unlinkSync,
} from 'node:fs';
import { join } from 'node:path';
import type { Config } from '../config/config.js';
import type { DiskSpec } from '../disk/spec.js';
import { HotplugError } from '../disk/errors.js';
import type { Backend, BuiltDevice, HookContext } from './types.js';
import { backendIds, ownerName, persistentOwner } from './naming.js';
import { parseCowParams, type CowParams } from './cow-params.js';
import { refuseWritableBase } from './sharing.js';
import { checkImagePath } from './image-path.js';
import { sourceOf } from './params-words.js';
import { detachLoop, loopsBacking, resizeLoop } from '../devices/losetup.js';
import { dmReload, dmStatus, dmTableLines, parseSnapshotStatus, type SnapshotStatus } from '../devices/dmsetup.js';
import type { Runner } from '../devices/runner.js';
import { findStep, recordsHolding, type JournalEntry } from '../journal/journal.js';
import { Build } from '../journal/steps.js';
import {
  diskLabel,
  GrowError,
  human,
  MiB,
  growPastThreshold,
  percent,
  targetBytes,
  wholeMiB,
  type GrowAction,
  type GrowDeps,
  type GrowSize,
  type ResizeDeps,
  type ResizeResult,
  type WatchOutcome,
  refuseIfRecorded,
} from './growth.js';
import { decodeDev, deviceSectors, devString, dmDevicePath, fileIdOf, type FileId } from '../devices/sysfs.js';
import {
  addBaseRef,
  addDm,
  addLoop,
  addStoreFile,
  addStoreOwner,
  checkStoreSpace,
  ensureStoreDir,
  recordedLoop,
  sharedUndo,
  STEP,
  type StepEnv,
} from './steps.js';

export interface CowPlan {
  params: CowParams;
  /** The base image after symlinks were resolved; the only path ever opened. */
  base: string;
  baseId: FileId;
  /** Set when the base is a block device: its own major:minor (decimal). */
  baseRdev: string | undefined;
  readOnly: boolean;
  /** The dm device's name. */
  name: string;
  domid: string;
  devid: string;
  /** mode w only. */
  store: { path: string; bytes: number; persistent: boolean; chunkKiB: number } | undefined;
}

/** `xbh-cow-<owner>-<vdev>-<devid>`: at most 8+48+1+48+1+10 < 127 characters, no `/`. */
export function dmName(disk: Pick<DiskSpec, 'domainName' | 'frontendId' | 'vdev'>, xenbusPath: string): string {
  const { domid, devid } = backendIds(xenbusPath);
  return `xbh-cow-${ownerName(disk, domid)}-${disk.vdev ?? 'disk'}-${devid}`;
}

/** The store's file name: persistent ones by owner and vdev (so the next add finds them), transient ones by backend path. */
export function storeName(
  params: CowParams,
  disk: Pick<DiskSpec, 'domainName' | 'frontendId' | 'vdev'>,
  xenbusPath: string,
): string {
  const { domid, devid } = backendIds(xenbusPath);
  if (params.store !== undefined) return params.store;
  if (params.persistent)
    return `${persistentOwner('block-cow', disk, xenbusPath, 'copy-on-write store', 'store=NAME')}-${disk.vdev ?? devid}.cow`;
  return `transient-${domid}-${devid}.cow`;
}

/**
 * The base image: checkImagePath's rules (a regular file or a block device below image_dirs,
 * resolved and opened read-only), and a file holds at least one sector.
 */
export function checkBase(
  raw: string,
  config: Config,
): { base: string; id: FileId; rdev: string | undefined; bytes: bigint } {
  const img = checkImagePath(raw, config.imageDirs, { allowBlockDevice: true, what: 'base image', fromParams: true });
  // A block device's st_size is 0: its size comes from sysfs once its loop exists (add()).
  const bytes = img.isBlockDevice ? 0n : img.stat.size;
  if (!img.isBlockDevice && bytes < 512n)
    throw new HotplugError(
      `block-cow: the base image ${img.real} is ${bytes} bytes; a disk image needs at least one 512-byte sector.`,
    );
  return {
    base: img.real,
    id: { dev: devString(img.stat.dev), ino: img.stat.ino.toString() },
    rdev: img.isBlockDevice ? devString(img.stat.rdev) : undefined,
    bytes,
  };
}

export function planCow(disk: DiskSpec, ctx: { config: Config; xenbusPath: string }): CowPlan {
  const params = parseCowParams(disk.params);
  const { base, id, rdev } = checkBase(params.base, ctx.config);
  const { domid, devid } = backendIds(ctx.xenbusPath);
  const readOnly = disk.mode === 'r';
  const store = readOnly
    ? undefined
    : {
        path: join(ctx.config.storeDir, storeName(params, disk, ctx.xenbusPath)),
        bytes: (params.sizeMiB ?? ctx.config.cow.defaultSizeMiB) * 1024 * 1024,
        persistent: params.persistent,
        chunkKiB: params.chunkKiB ?? ctx.config.cow.chunkKiB,
      };
  return {
    params,
    base,
    baseId: id,
    baseRdev: rdev,
    readOnly,
    name: dmName(disk, ctx.xenbusPath),
    domid,
    devid,
    store,
  };
}

// ---------------------------------------------------------------------------------------------
// sharing

/** The journal record (backend path) whose loop step is on file `id`, for messages. */
function loopOwner(ctx: HookContext, id: FileId): string | undefined {
  return recordsHolding(
    ctx.journal.list().entries,
    STEP.loop,
    { dev: id.dev, ino: id.ino },
    ctx.build.entry.backendPath,
  )[0]?.backendPath;
}

// ---------------------------------------------------------------------------------------------
// add

async function addCow(ctx: HookContext, plan: CowPlan): Promise<BuiltDevice> {
  const env: StepEnv = { build: ctx.build, run: ctx.run, config: ctx.config, log: ctx.log, journal: ctx.journal };
  // Before anything is built: a full store filesystem is the administrator's to fix.
  if (plan.store) checkStoreSpace(ctx.config.storeDir);
  const baseLoop = await addBaseRef(env, plan.base, plan.baseId, (onBase) =>
    refuseWritableBase(ctx.xs, {
      hook: 'block-cow',
      base: plan.base,
      baseId: plan.baseId,
      onBase,
      self: ctx.request.xenbusPath,
      disks: 'copy-on-write disks',
    }),
  );
  const sectors = deviceSectors(ctx.run, baseLoop.major, baseLoop.minor);
  if (sectors === 0) throw new HotplugError(`block-cow: the base image ${plan.base} has no whole 512-byte sector.`);
  const origin = `${baseLoop.major}:${baseLoop.minor}`;

  if (!plan.store) {
    const dm = await addDm(env, plan.name, `0 ${sectors} linear ${origin} 0`, { readOnly: true });
    return { path: dmDevicePath(plan.name, dm.minor, dm.major), major: dm.major, minor: dm.minor };
  }

  const s = plan.store;
  ensureStoreDir(ctx.config.storeDir);
  if (!s.persistent) {
    await clearLeftoverTransient(ctx, s.path);
    await clearLeftoverTransient(ctx, tailPath(s.path));
  } else await addStoreOwner(env, 'block-cow', s.path);
  const store = await addStoreFile(env, s.path, s.bytes, s.persistent);
  const storeId = { dev: store.dev, ino: store.ino };
  if (store.existed) {
    const have = statSync(s.path).size;
    ctx.log.info(
      `${ctx.request.xenbusPath}: reattaching persistent store ${s.path} (${Math.round(have / 1048576)} MiB)`,
    );
  }
  // A transient store is new and unique to this disk; a persistent one may be someone else's right now.
  const storeLoop = await addLoop(
    env,
    s.path,
    storeId,
    { readOnly: false },
    !s.persistent
      ? undefined
      : async (onStore) => {
          if (onStore.length === 0) return;
          const owner = loopOwner(ctx, storeId);
          throw new HotplugError(
            `block-cow: the copy-on-write store ${s.path} is already in use by ${onStore.map((l) => l.name).join(', ')}${owner ? ` (disk ${owner})` : ''}; a store serves one writer: remove that disk first or choose another store=.`,
            'busy',
          );
        },
  );
  let table = `0 ${sectors} snapshot ${origin} ${storeLoop.major}:${storeLoop.minor} ${s.persistent ? 'P' : 'N'} ${s.chunkKiB * 2}`;
  // A persistent disk resized past its base comes back at that size: its tail is mapped again.
  if (s.persistent && existsSync(tailPath(s.path))) {
    const tail = await addStoreFile(env, tailPath(s.path), 0, true);
    const tailLoop = await addLoop(
      env,
      tailPath(s.path),
      { dev: tail.dev, ino: tail.ino },
      { readOnly: false },
      async (onTail) => {
        if (onTail.length)
          throw new HotplugError(
            `block-cow: the tail ${tailPath(s.path)} of the store ${s.path} is already in use by ${onTail.map((l) => l.name).join(', ')}; remove that disk first.`,
            'busy',
          );
      },
    );
    table += `\n${tailLine(ctx.run, sectors, tailLoop)}`;
  }
  const dm = await addDm(env, plan.name, table);
  return { path: dmDevicePath(plan.name, dm.minor, dm.major), major: dm.major, minor: dm.minor };
}

/**
 * A transient store is named after its backend path, and that path's earlier record was undone
 * before this add began: a file still there is a leftover of a crash or a reboot, unless a loop
 * still uses it.
 */
async function clearLeftoverTransient(ctx: HookContext, path: string): Promise<void> {
  let st;
  try {
    st = lstatSync(path, { bigint: true });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw e;
  }
  if (!st.isFile())
    throw new HotplugError(
      `block-cow: ${path} is in the way of this disk's store and is not a regular file; move it away.`,
    );
  const id = { dev: devString(st.dev), ino: st.ino.toString() };
  const loops = await loopsBacking(ctx.run, id);
  if (loops.length) {
    throw new HotplugError(
      `block-cow: the leftover store ${path} is still attached to ${loops.map((l) => l.name).join(', ')}; run "xen-blockhooks gc" or detach it first.`,
      'busy',
    );
  }
  ctx.log.warn(`${ctx.request.xenbusPath}: deleting leftover transient store ${path}`);
  unlinkSync(path);
}

// ---------------------------------------------------------------------------------------------
// grow and watch: the store file grows and its loop is re-read (`losetup -c`); dm-snapshot sees
// the new size at once, no reload. A snapshot the kernel dropped cannot be saved by growing.

export interface CowParts {
  dmName: string;
  storeFile: string;
  loop: string | undefined;
}

/** The snapshot and its store as block-cow recorded them, or undefined for a read-only disk. */
export function cowParts(entry: JournalEntry): CowParts | undefined {
  const dm = findStep(entry.steps, STEP.dm, (s) => !s.data.readOnly);
  const store = findStep(entry.steps, STEP.storeFile);
  if (!dm || !store) return undefined;
  const loopStep = findStep(entry.steps, STEP.loop, (s) => s.data.file === store.data.path);
  return { dmName: dm.data.name, storeFile: store.data.path, loop: loopStep?.data.loop };
}

export async function snapshotState(run: Runner, name: string): Promise<SnapshotStatus> {
  const l = (await dmStatus(run, name))[0];
  if (!l || l.target !== 'snapshot')
    throw new GrowError(`${name} is not a snapshot device (${l?.target ?? 'no table'})`);
  return parseSnapshotStatus(l.params);
}

function droppedMessage(name: string, s: SnapshotStatus): string {
  return `${name} is ${s.state === 'invalid' ? 'Invalid' : s.state}: its copy-on-write store overflowed and the kernel dropped the snapshot; growing cannot bring it back (the disk must be removed and added again, its changes are lost)`;
}

export async function growCowStore(
  entry: JournalEntry,
  size: GrowSize | undefined,
  deps: GrowDeps,
): Promise<GrowAction> {
  const p = cowParts(entry);
  if (!p)
    throw new GrowError(`${diskLabel(entry)} (${entry.backendPath}) has no copy-on-write store (a read-only disk?)`);
  const s = await snapshotState(deps.run, p.dmName);
  if (s.state !== 'active') throw new GrowError(droppedMessage(p.dmName, s));
  const st = lstatSync(p.storeFile, { bigint: true });
  if (!st.isFile()) throw new GrowError(`${p.storeFile} is not a regular file`);
  const loops = await loopsBacking(deps.run, { dev: devString(st.dev), ino: st.ino.toString() });
  const loop = loops.find((l) => l.name === p.loop) ?? loops[0];
  if (!loop) throw new GrowError(`no loop device serves the store ${p.storeFile} of ${entry.backendPath}`);
  const before = Number(st.size);
  const after = targetBytes(before, size, deps.config.watch.stepPercent, MiB);
  if (after <= before)
    throw new GrowError(
      `${p.storeFile} is already ${human(before)}; ${human(after)} is not larger (stores never shrink)`,
    );
  truncateSync(p.storeFile, after);
  await resizeLoop(deps.run, loop.name);
  deps.log.info(
    `grow ${entry.backendPath} (${diskLabel(entry)}): store ${p.storeFile} ${human(before)} → ${human(after)}, ${loop.name} re-read`,
    { action: 'grow', kind: 'cow-store' },
  );
  return {
    backendPath: entry.backendPath,
    script: entry.script,
    kind: 'cow-store',
    target: p.storeFile,
    beforeBytes: before,
    afterBytes: after,
  };
}

async function watchCow(entry: JournalEntry, deps: GrowDeps): Promise<WatchOutcome> {
  const out: WatchOutcome = { findings: [], grown: [] };
  const p = cowParts(entry);
  if (!p) return out; // read-only: nothing can fill
  const at = { backendPath: entry.backendPath, script: entry.script, device: p.dmName };
  const s = await snapshotState(deps.run, p.dmName);
  if (s.state !== 'active') {
    const m = `${p.dmName} (${entry.backendPath}) is ${s.state === 'invalid' ? 'Invalid' : s.state}: the copy-on-write store overflowed and the kernel dropped the snapshot; the guest gets I/O errors and its changes are lost. Remove and add the disk again.`;
    out.findings.push({ ...at, state: 'invalid', message: m });
    return out;
  }
  const used = percent(s.allocatedSectors + s.metadataSectors, s.totalSectors);
  return growPastThreshold(out, at, used, deps, {
    store: 'store',
    grow: () => growCowStore(entry, undefined, deps),
    grown: 'store grown to',
  });
}

// ---------------------------------------------------------------------------------------------
// resize: dm-snapshot is exactly as large as its origin, so a disk larger than its base is two
// ranges of one device: the snapshot over the base's range, then a linear tail on a second
// sparse file, `<store>.tail`, as persistent as the store. Growing reloads the device's table
// with the longer tail (the snapshot line is unchanged, so the kernel hands its exceptions over
// to the new table); a persistent disk's tail is found again by the next add. A disk never
// shrinks: dm-snapshot does not say which sectors the guest wrote.

export function tailPath(store: string): string {
  return `${store}.tail`;
}

function tailLine(run: Runner, start: number, loop: { major: number; minor: number }): string {
  const bytes = deviceSectors(run, loop.major, loop.minor) * 512;
  return `${start} ${bytes / 512} linear ${loop.major}:${loop.minor} 0`;
}

async function resizeCow(entry: JournalEntry, bytes: number, deps: ResizeDeps): Promise<ResizeResult> {
  const p = cowParts(entry);
  if (!p)
    throw new GrowError(
      `${diskLabel(entry)} (${entry.backendPath}) is a read-only disk over its base: it is as large as the base image`,
    );
  const state = await snapshotState(deps.run, p.dmName);
  if (state.state !== 'active') throw new GrowError(droppedMessage(p.dmName, state));
  const lines = await dmTableLines(deps.run, p.dmName);
  const snap = lines[0];
  if (!snap || snap.target !== 'snapshot' || snap.start !== 0n)
    throw new GrowError(`${p.dmName} does not start with a snapshot (${snap?.target ?? 'no table'})`);
  const baseSectors = Number(snap.length);
  const before = (baseSectors + Number(lines[1]?.length ?? 0n)) * 512;
  if (bytes < before)
    throw new GrowError(
      `${diskLabel(entry)} is ${human(before)}: block-cow never shrinks a disk (dm-snapshot does not say which sectors the guest wrote, so the new end could cut off its data)`,
    );
  const tailBytes = wholeMiB(bytes - baseSectors * 512);
  const after = baseSectors * 512 + tailBytes;
  if (after <= before) throw new GrowError(`${diskLabel(entry)} is already ${human(before)}`);
  const file = tailPath(p.storeFile);
  const hadStep = findStep(entry.steps, STEP.loop, (s) => s.data.file === file && s.done && s.data.loop !== undefined);
  const had = hadStep && recordedLoop(hadStep.data);
  let made = false;
  let hadBytes: number | undefined;
  let table: string;
  try {
    let loop: { name: string; major: number; minor: number };
    if (had) {
      hadBytes = statSync(file).size;
      truncateSync(file, tailBytes);
      await resizeLoop(deps.run, had.name);
      loop = had;
    } else {
      if (existsSync(file))
        throw new GrowError(`${file} exists but is not part of ${diskLabel(entry)}: move it away first`);
      const persistent =
        findStep(entry.steps, STEP.storeFile, (s) => s.data.path === p.storeFile)?.data.persistent === true;
      // The tail's steps go in front of the device's own, so that a remove takes the device away first.
      const at = entry.steps.findIndex((s) => s.kind === STEP.dm && s.data.name === p.dmName);
      const env: StepEnv = {
        build: new Build(entry, deps.journal, at),
        run: deps.run,
        config: deps.config,
        log: deps.log,
        journal: deps.journal,
      };
      const f = await addStoreFile(env, file, tailBytes, persistent);
      made = !f.existed;
      loop = await addLoop(env, file, { dev: f.dev, ino: f.ino }, { readOnly: false });
    }
    table = `0 ${baseSectors} snapshot ${snap.params}\n${tailLine(deps.run, baseSectors, loop)}`;
    await dmReload(deps.run, p.dmName, table);
  } catch (e) {
    if (made) {
      // Nothing uses a tail this resize made: it goes (its loop, its file, its steps), so neither
      // a remove nor the next add finds a larger disk than the guest was given.
      const id = existsSync(file) ? fileIdOf(file) : undefined;
      if (id)
        for (const l of await loopsBacking(deps.run, id).catch(() => []))
          await detachLoop(deps.run, l.name).catch(() => false);
      if (existsSync(file)) unlinkSync(file);
      entry.steps = entry.steps.filter(
        (s) => !((s.kind === STEP.loop && s.data.file === file) || (s.kind === STEP.storeFile && s.data.path === file)),
      );
      deps.journal.save(entry);
    } else if (had && hadBytes !== undefined) {
      // The table still maps the tail's old length: the file goes back to it, so a persistent
      // disk's next add maps the size the guest has, not the one this resize failed to give.
      truncateSync(file, hadBytes);
      await resizeLoop(deps.run, had.name).catch(() => {});
    }
    throw e;
  }
  const dmStep = findStep(entry.steps, STEP.dm, (s) => s.data.name === p.dmName);
  if (dmStep) dmStep.data.table = table;
  deps.journal.save(entry);
  const how = `${file} ${made ? 'made' : 'extended'} (${human(tailBytes)} past the base), ${p.dmName} reloaded`;
  deps.log.info(`resize ${entry.backendPath} (${diskLabel(entry)}): ${human(before)} → ${human(after)}: ${how}`, {
    action: 'resize',
  });
  return {
    backendPath: entry.backendPath,
    script: entry.script,
    target: p.dmName,
    beforeBytes: before,
    afterBytes: after,
    online: true,
    how,
  };
}

/** A persistent disk not attached: its tail is made or extended in place, for the next add. */
async function resizeCowDetached(plan: CowPlan, bytes: number, deps: ResizeDeps): Promise<ResizeResult> {
  const s = plan.store;
  if (!s) throw new GrowError(`a read-only block-cow disk is as large as its base ${plan.base}`);
  if (!s.persistent)
    throw new GrowError(
      `a transient block-cow disk exists only while it is attached: resize it through its domain and vdev, or make it persistent`,
    );
  if (!existsSync(s.path))
    throw new GrowError(
      `the persistent store ${s.path} does not exist yet: nothing to resize (its first add makes it, as large as the base)`,
    );
  const file = tailPath(s.path);
  for (const f of [s.path, file]) refuseIfRecorded(deps.journal, f, 'the store');
  for (const f of [s.path, file]) {
    if (!existsSync(f)) continue;
    const st = statSync(f, { bigint: true });
    const on = await loopsBacking(deps.run, { dev: devString(st.dev), ino: st.ino.toString() });
    if (on.length) throw new GrowError(`${f} is in use by ${on.map((l) => l.name).join(', ')}: not resized`);
  }
  const baseBytes = plan.baseRdev
    ? deviceSectorsOfPath(deps.run, plan.base) * 512
    : Math.floor(statSync(plan.base).size / 512) * 512;
  const had = existsSync(file) ? statSync(file).size : 0;
  const before = baseBytes + had;
  if (bytes < before)
    throw new GrowError(
      `the disk is ${human(before)}: block-cow never shrinks a disk (dm-snapshot does not say which sectors the guest wrote)`,
    );
  const tailBytes = wholeMiB(bytes - baseBytes);
  if (baseBytes + tailBytes <= before) throw new GrowError(`the disk is already ${human(before)}`);
  if (had === 0 && !existsSync(file))
    closeSync(openSync(file, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600));
  truncateSync(file, tailBytes);
  const how = `${file} ${had ? 'extended' : 'made'} (${human(tailBytes)} past the base); the next add maps it`;
  deps.log.info(
    `resize of a detached disk: store ${s.path}: ${human(before)} → ${human(baseBytes + tailBytes)}: ${how}`,
    { action: 'resize' },
  );
  return {
    backendPath: '',
    script: 'block-cow',
    target: s.path,
    beforeBytes: before,
    afterBytes: baseBytes + tailBytes,
    online: false,
    how,
  };
}

function deviceSectorsOfPath(run: Runner, path: string): number {
  const { major, minor } = decodeDev(statSync(path, { bigint: true }).rdev);
  return deviceSectors(run, major, minor);
}

export const cowBackend: Backend<CowPlan> = {
  source: (params) => sourceOf(() => parseCowParams(params).base),
  script: 'block-cow',
  summary: 'copy-on-write disk on device-mapper over a shared read-only base image',
  usage: [
    'params: <base-image> [<cow-size>] [persistent[=yes|no]] [store=NAME] [chunk=SIZE]',
    '  base-image  absolute path of a disk image (or block device) inside image_dirs; opened read-only;',
    '              it may hold spaces (the words after it are read from the right)',
    '  cow-size    size of the copy-on-write store: 30 (a bare number is MiB), 512M, 1.5G, 2T; rounded up',
    '              to whole MiB; default cow.default_size',
    '  persistent  keep the store after remove and reattach it on the next add of the same domain and vdev',
    '  store=NAME  persistent store file NAME in store_dir (implies persistent)',
    '  chunk=SIZE  snapshot chunk size, a power of two from 4K to 512K; default cow.chunk',
    'xl:  disk = [ "vdev=sda1,access=w,script=block-cow,target=/srv/xen/rootfs.img 30" ]',
    'xm:  disk = [ "cow:/srv/xen/rootfs.img 30,sda1,w" ]',
    'access=r hands out a read-only device over the base and needs no store.',
  ].join('\n'),
  plan: (disk, ctx) => planCow(disk, ctx),
  add: addCow,
  transient: (plan) =>
    plan.store && !plan.store.persistent ? `transient copy-on-write store ${plan.store.path}` : undefined,
  undo: sharedUndo,
  grow: (entry, size, deps) => growCowStore(entry, size, deps),
  resize: resizeCow,
  resizeDetached: resizeCowDetached,
  watch: watchCow,
};
