/**
 * block-thin: thin-provisioned copy-on-write disks. One dm thin-pool serves every domain; each disk
 * is a `thin` device whose external origin is the read-only base image (its loop shared as
 * block-cow shares it).
 *
 *   base image ──losetup -r (shared, base-ref)────────────────────────┐
 *   pool data file ──loop──┐                                          │
 *   pool metadata file ─loop─┴─ dm thin-pool xbh-thinpool ── thin <id> <base> ─→ guest
 *   mode r:  base image ──losetup -r (shared)── dm linear, read-only ─→ guest
 *
 * Steps (journaled before each runs; undone newest first):
 *   base-ref   the shared base loop (steps.ts)
 *   thin-pool  a reference on the pool, created on first use under the pool lock; torn down when no
 *              other record refers to it (unless thin.keep_pool)
 *   thin       an id no record and no persistent volume holds, chosen under the pool lock; undo
 *              deletes it, except a persistent volume
 *   dm         the thin device (steps.ts)
 *
 * Pool files in store_dir: thin-pool.data, thin-pool.meta, thin-pool.volumes.json (the persistent
 * volumes) and thin-pool.transient.json (transient ids, written before `create_thin`, dropped after
 * `delete`). The journal is in /run, the pool on disk: after a crash or reboot the transient list
 * tells leftovers from persistent volumes; they are deleted when the pool starts again or by `gc`,
 * as are pool files no record and no persistent volume needs.
 *
 * Pool on devices (thin.data_device, thin.metadata_device): a metadata device whose first 4 KiB are
 * zero starts a new pool, anything else must be this pool's metadata; it is zeroed at teardown when
 * no persistent volume remains. The devices themselves are the administrator's, never removed.
 */
import {
  closeSync,
  existsSync,
  constants as fsc,
  fstatSync,
  fsyncSync,
  ftruncateSync,
  lstatSync,
  openSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  truncateSync,
  unlinkSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { join } from 'node:path';
import type { Config } from '../config/config.js';
import {
  dmCreate,
  dmInfo,
  dmReload,
  dmRemove,
  dmStatus,
  dmTable,
  dmTableLines,
  parseThinStatus,
} from '../devices/dmsetup.js';
import { CommandError, type Runner } from '../devices/runner.js';
import { decodeDev } from '../devices/sysfs.js';
import {
  createThin,
  deleteThin,
  poolSectors,
  poolStatus,
  poolTable,
  poolUsage,
  type PoolUsage,
} from '../devices/thin.js';
import { lvExtendTo } from '../devices/lvm.js';
import type { DiskSpec } from '../disk/spec.js';
import { HotplugError, messageOf } from '../disk/errors.js';
import { findStep, recordsHolding, type JournalEntry, type StepKind, type StepRecord } from '../journal/journal.js';
import type { UndoContext, UndoRegistry } from '../journal/steps.js';
import { acquireFlock, withFlock, xenBlockLockPath, type HeldLock } from '../lock/flock.js';
import { lockOptions, thinPoolLockPath } from '../lock/paths.js';
import type { Logger } from '../log/logger.js';
import { detachLoop, loopsBacking, resizeLoop, type LoopInfo } from '../devices/losetup.js';
import { deviceSectors, devString, dmDevicePath, fileIdOf, type FileId } from '../devices/sysfs.js';
import { sizeLikeEnd } from './cow-params.js';
import {
  basePathOf,
  paramsRefusal,
  parseSizePersistent,
  sizeOrPersistentWord,
  sourceOf,
  splitPathWords,
} from './params-words.js';
import { backendIds, ownerName, persistentOwner } from './naming.js';
import { checkImagePath } from './image-path.js';
import { refuseWritableBase } from './sharing.js';
import { addBaseRef, addDm, attachLoopChecked, ensureStoreDir, sharedUndo, type StepEnv } from './steps.js';
import type { Backend, BuiltDevice, CollectContext, HookContext, Leftover, LeftoverContext } from './types.js';
import {
  diskLabel,
  GrowError,
  human,
  MiB,
  targetBytes,
  wholeMiB,
  type GrowAction,
  type GrowDeps,
  type GrowSize,
  type ResizeDeps,
  type ResizeResult,
  type WatchOutcome,
} from './growth.js';

export const THIN_POOL_NAME = 'xbh-thinpool';
export const THIN_STEP = { pool: 'thin-pool', thin: 'thin' } as const satisfies Record<string, StepKind>;

// ---------------------------------------------------------------------------------------------
// params

export interface ThinParams {
  base: string;
  /** Virtual size in MiB when given; default the base's size. */
  sizeMiB: number | undefined;
  persistent: boolean;
}

const USAGE_LINE = '<base-image> [<size>] [persistent[=yes|no]]';

const bad = paramsRefusal('block-thin', USAGE_LINE, '/srv/xen/rootfs.img 20G');

export function parseThinParams(params: string): ThinParams {
  const split = splitPathWords(params, sizeOrPersistentWord);
  if (split === undefined) throw bad(params, 'no base image given');
  const base = basePathOf(split, (what) => bad(params, what));
  const end = sizeLikeEnd(split.lastWord);
  if (end) throw bad(params, end);
  return {
    base,
    ...parseSizePersistent(split.rest, (what) => bad(params, what), { size: 'size', path: 'the base image' }),
  };
}

// ---------------------------------------------------------------------------------------------
// names and files

export interface PoolFiles {
  name: string;
  data: string;
  meta: string;
  volumes: string;
  /** The transient ids made in the pool and not yet deleted (id → backend path). */
  transient: string;
}

export function poolFiles(config: Pick<Config, 'storeDir'>): PoolFiles {
  return {
    name: THIN_POOL_NAME,
    data: join(config.storeDir, 'thin-pool.data'),
    meta: join(config.storeDir, 'thin-pool.meta'),
    volumes: join(config.storeDir, 'thin-pool.volumes.json'),
    transient: join(config.storeDir, 'thin-pool.transient.json'),
  };
}

/** `xbh-thin-<owner>-<vdev>-<devid>`. */
export function thinDmName(disk: Pick<DiskSpec, 'domainName' | 'frontendId' | 'vdev'>, xenbusPath: string): string {
  const { domid, devid } = backendIds(xenbusPath);
  return `xbh-thin-${ownerName(disk, domid)}-${disk.vdev ?? 'disk'}-${devid}`;
}

/** The persistent volume's key: owner and vdev (the next add of the same disk finds it). */
function persistentVolumeKey(disk: Pick<DiskSpec, 'domainName' | 'frontendId' | 'vdev'>, xenbusPath: string): string {
  persistentOwner('block-thin', disk, xenbusPath, 'thin volume', undefined);
  return volumeKey(disk, xenbusPath);
}

export function volumeKey(disk: Pick<DiskSpec, 'domainName' | 'frontendId' | 'vdev'>, xenbusPath: string): string {
  const { domid, devid } = backendIds(xenbusPath);
  return `${ownerName(disk, domid)}-${disk.vdev ?? devid}`;
}

export interface PersistentVolume {
  id: number;
  sectors: number;
  base: { file: string; dev: string; ino: string };
}

/** One map kept in a small JSON file `{version: 1, <key>: {...}}`; no file means an empty map. */
function readMap<T>(file: string, key: string): Record<string, T> {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return {};
    throw e;
  }
  return (JSON.parse(text) as Record<string, Record<string, T> | undefined>)[key] ?? {};
}

/** Replace the file atomically (the caller holds the pool lock); an empty map deletes it. */
function writeMap<T>(file: string, key: string, map: Record<string, T>): void {
  if (Object.keys(map).length === 0) {
    rmSync(file, { force: true });
    return;
  }
  const tmp = `${file}.${process.pid}.tmp`;
  writeFileSync(tmp, `${JSON.stringify({ version: 1, [key]: map }, null, 1)}\n`, { mode: 0o600 });
  renameSync(tmp, file);
}

export function readVolumes(file: string): Record<string, PersistentVolume> {
  return readMap<PersistentVolume>(file, 'volumes');
}

export function writeVolumes(file: string, volumes: Record<string, PersistentVolume>): void {
  writeMap(file, 'volumes', volumes);
}

/** thin-pool.transient.json: id → the backend path whose add made it. */
export function readTransientIds(file: string): Record<string, string> {
  return readMap<string>(file, 'ids');
}

function writeTransientIds(file: string, ids: Record<string, string>): void {
  writeMap(file, 'ids', ids);
}

/** Add or drop one transient id (caller holds the pool lock). */
function noteTransientId(config: Pick<Config, 'storeDir'>, id: number, backendPath: string | undefined): void {
  const f = poolFiles(config);
  const ids = readTransientIds(f.transient);
  if (backendPath === undefined) {
    if (!(String(id) in ids)) return;
    delete ids[String(id)];
  } else {
    ids[String(id)] = backendPath;
  }
  writeTransientIds(f.transient, ids);
}

/**
 * Transient ids listed as made in the pool that no journal record holds (a crash's or a reboot's
 * leftovers), and no persistent volume either (a list left by an older run cannot make gc delete
 * a kept volume).
 */
export function leftoverThinIds(
  config: Pick<Config, 'storeDir'>,
  entries: readonly { steps: readonly StepRecord[] }[],
): number[] {
  const f = poolFiles(config);
  const held = new Set<number>(Object.values(readVolumes(f.volumes)).map((v) => v.id));
  for (const e of entries) for (const st of e.steps) if (st.kind === THIN_STEP.thin) held.add(st.data.id);
  return Object.keys(readTransientIds(f.transient))
    .map(Number)
    .filter((id) => Number.isInteger(id) && !held.has(id))
    .sort((a, b) => a - b);
}

/**
 * Delete leftover transient ids from the running pool (caller holds the pool lock). Returns the
 * ids deleted or found already gone; an id the pool refuses to delete stays listed, with a
 * warning, and the caller goes on.
 */
export async function reclaimThinIds(
  run: Runner,
  config: Pick<Config, 'storeDir'>,
  journal: { list(): { entries: { steps: StepRecord[] }[] } },
  log: Logger,
): Promise<number[]> {
  const done: number[] = [];
  for (const id of leftoverThinIds(config, journal.list().entries)) {
    let deleted: boolean;
    try {
      deleted = await deleteThin(run, THIN_POOL_NAME, id);
    } catch (e) {
      // Reclaiming is housekeeping: a pool that refuses it (read-only metadata, needs_check)
      // must not fail the add that started it. The id stays listed for gc or the next start.
      log.warn(
        `block-thin: could not delete leftover transient thin volume id ${id} (${messageOf(e)}); it stays listed`,
      );
      continue;
    }
    noteTransientId(config, id, undefined);
    log.warn(
      `block-thin: ${deleted ? 'deleted' : 'dropped (not in the pool)'} leftover transient thin volume id ${id}, which no record holds (left by a crash or a reboot)`,
    );
    done.push(id);
  }
  return done;
}

/**
 * gc: delete one leftover transient id from the running pool, judged again under the pool lock
 * (an add holds that lock from journaling its id until the id exists).
 */
export async function collectThinId(
  run: Runner,
  config: Config,
  journal: { list(): { entries: { steps: StepRecord[] }[] } },
  log: Logger,
  id: number,
): Promise<void> {
  const lock = await acquireFlock(poolLockPath(config), lockOptions(config, run));
  try {
    if (!leftoverThinIds(config, journal.list().entries).includes(id))
      throw new Error(`thin id ${id} is held by a record now (or no longer listed); left alone`);
    if (!(await dmInfo(run, THIN_POOL_NAME)))
      throw new Error(`the thin pool ${THIN_POOL_NAME} is not running; the id is deleted when it next starts`);
    const deleted = await deleteThin(run, THIN_POOL_NAME, id);
    noteTransientId(config, id, undefined);
    log.info(`gc: ${deleted ? 'deleted' : 'dropped (not in the pool)'} leftover transient thin volume id ${id}`);
  } finally {
    await lock.release();
  }
}

/**
 * The pool's files are a crash's leftovers when the pool does not run, no loop holds them, no
 * record has the pool, no persistent volume lives in them, and the pool is not meant to be kept.
 */
export function leftoverPoolFiles(
  config: Pick<Config, 'storeDir' | 'thin'>,
  entries: readonly { steps: readonly StepRecord[] }[],
  running: boolean,
  looped: (file: string) => boolean,
): string[] {
  if (running || poolOnDevices(config) || config.thin.keepPool) return [];
  if (entries.some((e) => e.steps.some((st) => st.kind === THIN_STEP.pool))) return [];
  const f = poolFiles(config);
  if (Object.keys(readVolumes(f.volumes)).length) return [];
  const files = [f.data, f.meta].filter((x) => fileId(x) !== undefined);
  if (files.some(looped)) return [];
  return fileId(f.transient) === undefined ? files : [...files, f.transient];
}

// ---------------------------------------------------------------------------------------------
// plan

export interface ThinPlan {
  params: ThinParams;
  base: string;
  baseId: FileId;
  baseSectors: number;
  readOnly: boolean;
  name: string;
  key: string;
  /** Virtual size in sectors (mode w). */
  sectors: number;
}

export function planThin(disk: DiskSpec, ctx: { config: Config; xenbusPath: string }): ThinPlan {
  const params = parseThinParams(disk.params);
  const img = checkImagePath(params.base, ctx.config.imageDirs, {
    allowBlockDevice: true,
    what: 'base image',
    fromParams: true,
  });
  const baseId = { dev: devString(img.stat.dev), ino: img.stat.ino.toString() };
  const bytes = img.isBlockDevice ? 0n : img.stat.size;
  if (!img.isBlockDevice && bytes < 512n)
    throw new HotplugError(
      `block-thin: the base image ${params.base} is ${bytes} bytes; a disk image needs at least one 512-byte sector.`,
    );
  const baseSectors = Number(bytes / 512n);
  const readOnly = disk.mode === 'r';
  if (readOnly && params.persistent)
    throw new HotplugError(
      `block-thin params "${disk.params}": persistent makes no sense for a read-only disk (access=r has no volume to keep).`,
    );
  return {
    params,
    base: img.real,
    baseId,
    baseSectors,
    readOnly,
    name: thinDmName(disk, ctx.xenbusPath),
    key: params.persistent && !readOnly ? persistentVolumeKey(disk, ctx.xenbusPath) : volumeKey(disk, ctx.xenbusPath),
    sectors: params.sizeMiB !== undefined ? params.sizeMiB * 2048 : baseSectors,
  };
}

// ---------------------------------------------------------------------------------------------
// the pool

function poolLockPath(config: Config): string {
  return thinPoolLockPath(config.stateDir, THIN_POOL_NAME);
}

/** Open `path` as our pool file: create it sparse (0600, O_EXCL) when missing; refuse anything but a regular file. */
function ensurePoolFile(path: string, bytes: number): { created: boolean; size: number } {
  let fd: number;
  let created = false;
  try {
    fd = openSync(path, fsc.O_RDWR | fsc.O_NOFOLLOW);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ELOOP')
      throw new HotplugError(
        `block-thin: the pool file ${path} is a symbolic link; pool files must be plain files in the store directory.`,
      );
    if (code !== 'ENOENT') throw e;
    fd = openSync(path, fsc.O_RDWR | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600);
    created = true;
    ftruncateSync(fd, bytes);
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw new HotplugError(`block-thin: the pool file ${path} is not a regular file; move it away.`);
    return { created, size: st.size };
  } finally {
    closeSync(fd);
  }
}

function fileId(path: string): FileId | undefined {
  try {
    const st = lstatSync(path, { bigint: true });
    return { dev: devString(st.dev), ino: st.ino.toString() };
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
}

/** The writable loop over `path`, reusing one left attached (a kept pool, a crashed add). */
async function poolLoop(run: Runner, config: Config, path: string): Promise<LoopInfo> {
  const id = fileId(path);
  if (!id) throw new Error(`pool file ${path} vanished`);
  return withFlock(
    xenBlockLockPath(config.xenLockDir),
    async () => {
      const existing = (await loopsBacking(run, id)).find((l) => !l.readOnly && l.offset === 0 && l.sizeLimit === 0);
      return existing ?? attachLoopChecked(run, path, id, { readOnly: false });
    },
    lockOptions(config, run),
  );
}

export interface PoolDevice {
  name: string;
  major: number;
  minor: number;
  created: boolean;
}

/** Majors and minors a dm table refers to (`maj:min` words). */
function tableDevices(params: string): string[] {
  return params.split(/\s+/).filter((w) => /^\d+:\d+$/.test(w));
}

/** thin.data_device and thin.metadata_device are set: the pool lives on them, not on files. */
export function poolOnDevices(config: Pick<Config, 'thin'>): boolean {
  return config.thin.dataDevice !== '' && config.thin.metadataDevice !== '';
}

/** A configured pool device: it must be a block device; its major:minor. */
export function poolDevice(path: string, what: 'data' | 'metadata'): { major: number; minor: number } {
  let st;
  try {
    st = statSync(path);
  } catch (e) {
    throw new HotplugError(
      `block-thin: the pool's ${what} device ${path} (thin.${what}_device) cannot be opened (${(e as NodeJS.ErrnoException).code ?? messageOf(e)}); create it (e.g. lvcreate) or fix /etc/xen/blockhooks.conf.`,
    );
  }
  if (!st.isBlockDevice())
    throw new HotplugError(
      `block-thin: the pool's ${what} device ${path} (thin.${what}_device) is not a block device.`,
    );
  const d = decodeDev(st.rdev);
  return { major: d.major, minor: d.minor };
}

/** Zero a pool metadata device's superblock (the first 4 KiB): the next pool on it starts empty. */
function wipeMetadataSuperblock(path: string): void {
  const fd = openSync(path, fsc.O_WRONLY);
  try {
    writeSync(fd, Buffer.alloc(4096), 0, 4096, 0);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/** The pool, created when it is not there yet. Caller holds the pool lock. */
export async function ensurePool(run: Runner, config: Config, log: Logger): Promise<PoolDevice> {
  const f = poolFiles(config);
  const onDevices = poolOnDevices(config);
  const info = await dmInfo(run, f.name);
  if (info) {
    const table = await dmTable(run, f.name);
    if (!table || table.target !== 'thin-pool')
      throw new HotplugError(
        `block-thin: a device-mapper device named ${f.name} exists and is not a thin pool; remove it (dmsetup remove ${f.name}) or rename it.`,
      );
    const devs = tableDevices(table.params);
    if (onDevices) {
      const data = poolDevice(config.thin.dataDevice, 'data');
      if (devs[1] !== `${data.major}:${data.minor}`) {
        throw new HotplugError(
          `block-thin: the thin pool ${f.name} is running on other devices than ${config.thin.dataDevice} (thin.data_device changed?); remove it or use the same configuration.`,
        );
      }
      return { name: f.name, major: info.major, minor: info.minor, created: false };
    }
    const dataId = fileId(f.data);
    const loops = dataId ? await loopsBacking(run, dataId) : [];
    if (!loops.some((l) => devs[1] === `${l.major}:${l.minor}`)) {
      throw new HotplugError(
        `block-thin: the thin pool ${f.name} is running on other devices than ${f.data} (another store_dir?); remove it or use the same configuration.`,
      );
    }
    return { name: f.name, major: info.major, minor: info.minor, created: false };
  }
  ensureStoreDir(config.storeDir);
  if (onDevices) return createPoolOnDevices(run, config, log);
  const data = ensurePoolFile(f.data, config.thin.dataMiB * 1048576);
  if (!data.created && fileId(f.meta) === undefined) {
    throw new HotplugError(
      `block-thin: the pool data file ${f.data} exists but its metadata file ${f.meta} does not; move the data file away (its volumes cannot be read without metadata).`,
    );
  }
  const meta = ensurePoolFile(f.meta, config.thin.metadataMiB * 1048576);
  if (meta.created && !data.created)
    log.warn(`block-thin: created a fresh metadata file ${f.meta} for the existing data file ${f.data}`);
  const metaLoop = await poolLoop(run, config, f.meta);
  const dataLoop = await poolLoop(run, config, f.data);
  const length = poolSectors(BigInt(deviceSectors(run, dataLoop.major, dataLoop.minor)) * 512n, config.thin.blockKiB);
  if (length === 0n)
    throw new HotplugError(
      `block-thin: the pool data file ${f.data} is smaller than one ${config.thin.blockKiB}K block; set thin.data_size.`,
    );
  const table = poolTable(
    length,
    { major: metaLoop.major, minor: metaLoop.minor },
    { major: dataLoop.major, minor: dataLoop.minor },
    config.thin.blockKiB,
  );
  const made = await dmCreate(run, f.name, table);
  log.info(
    `block-thin: created thin pool ${f.name} (${length / 2048n} MiB data, ${Math.round(meta.size / 1048576)} MiB metadata, ${config.thin.blockKiB}K blocks)`,
  );
  return { name: f.name, major: made.major, minor: made.minor, created: true };
}

async function createPoolOnDevices(run: Runner, config: Config, log: Logger): Promise<PoolDevice> {
  const name = THIN_POOL_NAME;
  const meta = poolDevice(config.thin.metadataDevice, 'metadata');
  const data = poolDevice(config.thin.dataDevice, 'data');
  const length = poolSectors(BigInt(deviceSectors(run, data.major, data.minor)) * 512n, config.thin.blockKiB);
  if (length === 0n)
    throw new HotplugError(
      `block-thin: the pool data device ${config.thin.dataDevice} is smaller than one ${config.thin.blockKiB}K block.`,
    );
  const table = poolTable(length, meta, data, config.thin.blockKiB);
  let made;
  try {
    made = await dmCreate(run, name, table);
  } catch (e) {
    if (!(e instanceof CommandError)) throw e;
    throw new HotplugError(
      `block-thin: the thin pool would not start on ${config.thin.metadataDevice} (metadata) and ${config.thin.dataDevice} (data): ${e.message}. If the metadata device holds something other than this pool's metadata (an old filesystem, another pool) and nothing needs it, zero its first 4 KiB (dd if=/dev/zero of=${config.thin.metadataDevice} bs=4096 count=1) to start a new pool.`,
      'error',
      { cause: e },
    );
  }
  log.info(
    `block-thin: started thin pool ${name} on ${config.thin.dataDevice} (${length / 2048n} MiB data) and ${config.thin.metadataDevice} (metadata), ${config.thin.blockKiB}K blocks`,
  );
  return { name, major: made.major, minor: made.minor, created: true };
}

/** Journal records other than `except` that hold a step of `kind` (the pool's users). */
function holders(
  ctx: UndoContext | { journal: UndoContext['journal'] },
  kind: StepKind,
  except: string,
): { paths: string[]; unreadable: string[] } {
  const { entries, unreadable } = ctx.journal.list();
  return {
    paths: recordsHolding(entries, kind, {}, except).map((e) => e.backendPath),
    unreadable: unreadable.map((u) => u.file),
  };
}

/** Remove the pool, detach its loops, and delete its files when no persistent volume lives there. Caller holds the pool lock. */
export async function teardownPool(run: Runner, config: Config, log: Logger): Promise<void> {
  const f = poolFiles(config);
  await dmRemove(run, f.name, config.busyRetryMs);
  if (poolOnDevices(config)) {
    const kept = Object.keys(readVolumes(f.volumes));
    if (kept.length) {
      log.info(
        `block-thin: thin pool ${f.name} stopped; its metadata on ${config.thin.metadataDevice} stays for ${kept.length} persistent volume(s): ${kept.join(', ')}`,
      );
      return;
    }
    wipeMetadataSuperblock(config.thin.metadataDevice);
    rmSync(f.transient, { force: true });
    log.info(
      `block-thin: thin pool ${f.name} stopped; no persistent volumes, so its metadata superblock on ${config.thin.metadataDevice} was zeroed (the next pool starts empty)`,
    );
    return;
  }
  for (const file of [f.data, f.meta]) {
    const id = fileId(file);
    if (!id) continue;
    for (const l of await loopsBacking(run, id)) await detachLoop(run, l.name);
  }
  const kept = Object.keys(readVolumes(f.volumes));
  if (kept.length) {
    log.info(
      `block-thin: thin pool ${f.name} stopped; its files stay for ${kept.length} persistent volume(s): ${kept.join(', ')}`,
    );
    return;
  }
  rmSync(f.data, { force: true });
  rmSync(f.meta, { force: true });
  rmSync(f.transient, { force: true });
  log.info(`block-thin: thin pool ${f.name} stopped and its files deleted (no persistent volumes)`);
}

async function undoPool(_step: StepRecord<'thin-pool'>, ctx: UndoContext): Promise<void> {
  const lock = await acquireFlock(poolLockPath(ctx.config), lockOptions(ctx.config, ctx.run));
  try {
    const h = holders(ctx, THIN_STEP.pool, ctx.entry.backendPath);
    if (h.paths.length) {
      ctx.log.debug(`thin pool: ${h.paths.length} other disk(s) still use it`);
      return;
    }
    if (h.unreadable.length) {
      ctx.log.warn(
        `thin pool: kept because journal records ${h.unreadable.join(', ')} cannot be read (they may use it)`,
      );
      return;
    }
    if (ctx.config.thin.keepPool) {
      ctx.log.debug('thin pool: last user left; kept (thin.keep_pool)');
      return;
    }
    await teardownPool(ctx.run, ctx.config, ctx.log);
  } finally {
    await lock.release();
  }
}

/** Thin ids in use: every record's thin step (done or only intended) and every persistent volume. */
function usedIds(ctx: { journal: UndoContext['journal'] }, volumes: Record<string, PersistentVolume>): number[] {
  const ids: number[] = Object.values(volumes).map((v) => v.id);
  for (const e of ctx.journal.list().entries) {
    for (const s of e.steps) if (s.kind === THIN_STEP.thin) ids.push(s.data.id);
  }
  return ids;
}

async function undoThin(step: StepRecord<'thin'>, ctx: UndoContext): Promise<void> {
  const { id, pool, key } = step.data;
  const f = poolFiles(ctx.config);
  const lock = await acquireFlock(poolLockPath(ctx.config), lockOptions(ctx.config, ctx.run));
  try {
    if (step.data.persistent) {
      // Kept unless this very add made it and never finished.
      if (step.data.existed || ctx.entry.device !== undefined) return;
      const vols = readVolumes(f.volumes);
      if (vols[key]?.id === id) {
        delete vols[key];
        writeVolumes(f.volumes, vols);
      }
    }
    if (!(await dmInfo(ctx.run, pool))) {
      // Still listed as transient: the next start of the pool deletes it.
      ctx.log.debug(`thin id ${id}: pool ${pool} is not running; it is deleted when the pool next starts`);
      return;
    }
    const deleted = await deleteThin(ctx.run, pool, id);
    if (!step.data.persistent) noteTransientId(ctx.config, id, undefined);
    ctx.log.debug(`thin id ${id}: ${deleted ? 'deleted' : 'was not in the pool'}`);
  } finally {
    await lock.release();
  }
}

// ---------------------------------------------------------------------------------------------
// add

async function addThin(ctx: HookContext, plan: ThinPlan): Promise<BuiltDevice> {
  const env: StepEnv = { build: ctx.build, run: ctx.run, config: ctx.config, log: ctx.log, journal: ctx.journal };
  const baseLoop = await addBaseRef(env, plan.base, plan.baseId, (onBase) =>
    refuseWritableBase(ctx.xs, {
      hook: 'block-thin',
      base: plan.base,
      baseId: plan.baseId,
      onBase,
      self: ctx.request.xenbusPath,
      disks: 'thin disks',
    }),
  );
  const baseSectors = deviceSectors(ctx.run, baseLoop.major, baseLoop.minor);
  if (baseSectors === 0)
    throw new HotplugError(`block-thin: the base image ${plan.base} has no whole 512-byte sector.`);
  const origin = { major: baseLoop.major, minor: baseLoop.minor };
  if (plan.readOnly) {
    const dm = await addDm(env, plan.name, `0 ${baseSectors} linear ${origin.major}:${origin.minor} 0`, {
      readOnly: true,
    });
    return { path: dmDevicePath(plan.name, dm.minor, dm.major), major: dm.major, minor: dm.minor };
  }

  const f = poolFiles(ctx.config);
  let sectors = plan.params.sizeMiB !== undefined ? plan.sectors : baseSectors;
  let id: number;
  // The pool step is journaled before its lock is taken: a hook killed while it holds the lock
  // (libxl's SIGKILL) leaves a record whose undo takes the lock again and so also removes the
  // lock file, as the protocol lets the next holder do.
  let lock: HeldLock | undefined;
  let pool: PoolDevice;
  try {
    pool = await ctx.build.step(
      THIN_STEP.pool,
      { pool: f.name, data: f.data, meta: f.meta },
      async () => {
        lock = await acquireFlock(poolLockPath(ctx.config), lockOptions(ctx.config, ctx.run));
        return ensurePool(ctx.run, ctx.config, ctx.log);
      },
      (p) => ({ created: p.created, major: p.major, minor: p.minor }),
    );
    // A pool started from files or devices that outlived its journal: its leftover transient
    // volumes go before any id is chosen.
    if (pool.created) await reclaimThinIds(ctx.run, ctx.config, ctx.journal, ctx.log);
    const vols = readVolumes(f.volumes);
    const kept = plan.params.persistent ? vols[plan.key] : undefined;
    if (kept) {
      // One writer: the same domain's disk on another backend path (a migration's receiver on
      // this host: both ends name the volume after the domain) is refused while it is attached.
      const user = recordsHolding(
        ctx.journal.list().entries,
        THIN_STEP.thin,
        { id: kept.id, pool: f.name },
        ctx.build.entry.backendPath,
      )[0];
      if (user)
        throw new HotplugError(
          `block-thin: the persistent thin volume ${plan.key} is in use by ${user.backendPath}; a volume serves one writer: remove that disk first.`,
          'busy',
        );
      if (kept.base.dev !== plan.baseId.dev || kept.base.ino !== plan.baseId.ino) {
        throw new HotplugError(
          `block-thin: the persistent volume ${plan.key} was made over the base image ${kept.base.file}, not ${plan.base}; a thin volume only makes sense over its own base. Use that base, or drop persistent.`,
        );
      }
      // The volume's recorded size wins over a smaller size in params: it was resized since
      // (xen-blockhooks resize), and a disk never shrinks at an add. A larger size in params grows it.
      if (plan.params.sizeMiB === undefined || plan.sectors < kept.sectors) sectors = kept.sectors;
      if (plan.params.sizeMiB !== undefined && plan.sectors < kept.sectors) {
        ctx.log.info(
          `${ctx.request.xenbusPath}: the persistent thin volume ${plan.key} is ${kept.sectors / 2048} MiB (resized), larger than the ${plan.params.sizeMiB} MiB in its params; it keeps its size`,
        );
      }
    }
    id = kept ? kept.id : freePick(ctx, vols);
    await ctx.build.step(
      THIN_STEP.thin,
      { pool: f.name, id, persistent: plan.params.persistent, key: plan.key, existed: kept !== undefined },
      async () => {
        if (!plan.params.persistent) noteTransientId(ctx.config, id, ctx.request.xenbusPath);
        if (kept) {
          ctx.log.info(`${ctx.request.xenbusPath}: reattaching persistent thin volume ${plan.key} (id ${id})`);
        } else if ((await createThin(ctx.run, f.name, id)) === 'exists') {
          // No record and no persistent volume holds the id: a leftover of a lost state directory.
          ctx.log.warn(
            `${ctx.request.xenbusPath}: thin id ${id} was left in the pool by an earlier run; deleting it and starting afresh`,
          );
          await deleteThin(ctx.run, f.name, id);
          if ((await createThin(ctx.run, f.name, id)) !== 'created')
            throw new Error(`thin id ${id} still exists after delete`);
        }
        if (plan.params.persistent) {
          const v = readVolumes(f.volumes);
          v[plan.key] = { id, sectors, base: { file: plan.base, dev: plan.baseId.dev, ino: plan.baseId.ino } };
          writeVolumes(f.volumes, v);
        }
      },
    );
  } finally {
    await lock?.release();
  }
  const table = `0 ${sectors} thin ${pool.major}:${pool.minor} ${id} ${origin.major}:${origin.minor}`;
  const dm = await addDm(env, plan.name, table);
  return { path: dmDevicePath(plan.name, dm.minor, dm.major), major: dm.major, minor: dm.minor };
}

function freePick(ctx: HookContext, vols: Record<string, PersistentVolume>): number {
  const used = new Set(usedIds(ctx, vols));
  for (let i = 0; i <= 0xffffff; i++) if (!used.has(i)) return i;
  throw new HotplugError('block-thin: the thin pool has no free device id left.');
}

/** The thin device's status, for `status` and the watcher. */
export async function thinDeviceStatus(run: Runner, name: string): Promise<string | undefined> {
  try {
    return (await dmStatus(run, name))[0]?.params;
  } catch (e) {
    return `unreadable: ${messageOf(e)}`;
  }
}

// ---------------------------------------------------------------------------------------------
// grow and watch: the shared pool is what fills (a thin volume never overflows). Its data (or
// metadata) file is enlarged, its loop re-read and the pool's table reloaded with the new length
// (`dmsetup reload` + `resume`); on devices, `lvextend` then reload. A pool out of data space
// starts taking writes again.

/** dm-thin uses at most this much metadata (THIN_METADATA_MAX_SECTORS, 255 * 2^14 * 8 sectors). */
export const THIN_METADATA_MAX_BYTES = 255 * 16384 * 8 * 512;

/** Reload the pool's own table with `length` sectors (or unchanged) and resume: the pool picks up both devices' sizes. */
async function reloadPool(run: Runner, name: string, length?: bigint): Promise<void> {
  const t = await dmTable(run, name);
  if (!t || t.target !== 'thin-pool') throw new GrowError(`${name} is not a thin pool`);
  await dmReload(run, name, `0 ${length ?? t.length} thin-pool ${t.params}`);
}

function tooSmall(part: 'data' | 'metadata', what: string, before: number, after: number): GrowError {
  const limit = part === 'metadata' && before >= THIN_METADATA_MAX_BYTES ? " (dm-thin's metadata limit)" : '';
  return new GrowError(`the pool's ${part} ${what} is already ${human(before)}; ${human(after)} is not larger${limit}`);
}

/**
 * Grow the shared pool's data (default) or metadata, under the pool lock. Works on a pool that is
 * out of data space too: that is how a full pool is recovered.
 */
export async function growThinPool(
  part: 'data' | 'metadata',
  size: GrowSize | undefined,
  deps: GrowDeps,
  who = 'pool',
): Promise<GrowAction> {
  const f = poolFiles(deps.config);
  const lock = await acquireFlock(poolLockPath(deps.config), lockOptions(deps.config, deps.run));
  try {
    if (!(await dmInfo(deps.run, f.name))) throw new GrowError(`the thin pool ${f.name} is not running`);
    const s = await poolStatus(deps.run, f.name);
    if (s.state !== 'ok')
      throw new GrowError(
        `the thin pool ${f.name} has failed (status ${s.state === 'fail' ? 'Fail' : 'Error'}); growing cannot repair it: run thin_check on its metadata`,
      );
    const align = part === 'data' ? deps.config.thin.blockKiB * 1024 : MiB;
    const cap = (n: number) => (part === 'metadata' ? Math.min(n, THIN_METADATA_MAX_BYTES) : n);
    let target: string;
    let before: number;
    let after: number;
    let how = '';
    if (poolOnDevices(deps.config)) {
      // lvextend rounds up to whole extents; for a device that is not an LV its refusal says so.
      const device = part === 'data' ? deps.config.thin.dataDevice : deps.config.thin.metadataDevice;
      const bytesOf = () => {
        const d = poolDevice(device, part);
        return deviceSectors(deps.run, d.major, d.minor) * 512;
      };
      target = device;
      before = bytesOf();
      after = cap(targetBytes(before, size, deps.config.watch.stepPercent, align));
      if (after <= before) throw tooSmall(part, `device ${device}`, before, after);
      await lvExtendTo(deps.run, device, after);
      after = bytesOf();
      how = ' (lvextend)';
    } else {
      target = part === 'data' ? f.data : f.meta;
      before = statSync(target).size;
      after = cap(targetBytes(before, size, deps.config.watch.stepPercent, align));
      if (after <= before) throw tooSmall(part, `file ${target}`, before, after);
      const loop = (await loopsBacking(deps.run, fileIdOf(target)))[0];
      if (!loop) throw new GrowError(`no loop device serves the pool file ${target}`);
      truncateSync(target, after);
      await resizeLoop(deps.run, loop.name);
    }
    await reloadPool(deps.run, f.name, part === 'data' ? poolSectors(after, deps.config.thin.blockKiB) : undefined);
    const u = poolUsage(await poolStatus(deps.run, f.name));
    deps.log.info(
      `grow ${who}: thin pool ${f.name} ${part} ${target} ${human(before)} → ${human(after)}${how}, reloaded; now data ${u.dataPercent}% metadata ${u.metadataPercent}%${u.problem ? `, ${u.problem}` : ''}`,
      { action: 'grow', kind: `thin-${part}` },
    );
    return {
      backendPath: who,
      script: 'block-thin',
      kind: part === 'data' ? 'thin-data' : 'thin-metadata',
      target,
      beforeBytes: before,
      afterBytes: after,
    };
  } finally {
    await lock.release();
  }
}

export async function thinPoolUsage(run: Runner, config: Config): Promise<PoolUsage | undefined> {
  const f = poolFiles(config);
  if (!(await dmInfo(run, f.name))) return undefined;
  return poolUsage(await poolStatus(run, f.name));
}

function usesPool(entry: JournalEntry): boolean {
  return entry.steps.some((s) => s.kind === THIN_STEP.pool);
}

/** The shared pool, once per watch pass, for the records that use it. */
async function watchPool(entries: JournalEntry[], deps: GrowDeps): Promise<WatchOutcome> {
  const out: WatchOutcome = { findings: [], grown: [] };
  const users = entries.filter(usesPool).map((e) => e.backendPath);
  if (!users.length) return out;
  const at = { backendPath: users[0] as string, script: 'block-thin', device: 'pool' };
  const u = await thinPoolUsage(deps.run, deps.config);
  if (!u) {
    out.findings.push({ ...at, state: 'error', message: `thin pool is not running, but ${users.join(', ')} use it` });
    return out;
  }
  if (u.problem === 'Fail' || u.problem === 'Error' || u.problem === 'needs_check') {
    out.findings.push({
      ...at,
      state: 'error',
      message: `thin pool has failed (${u.problem}); growing cannot repair it. Its disks: ${users.join(', ')}`,
    });
    return out;
  }
  // Out of data space (writes are failing) or metadata full: grow, and the finding says so.
  const threshold = deps.config.watch.thresholdPercent;
  if (u.dataPercent >= threshold || u.problem === 'out of data space')
    out.grown.push(await growThinPool('data', undefined, deps, 'watch'));
  if (u.metadataPercent >= threshold || (u.problem !== undefined && u.problem.startsWith('read-only')))
    out.grown.push(await growThinPool('metadata', undefined, deps, 'watch'));
  const grew = out.grown.length > 0;
  out.findings.push({
    ...at,
    usedPercent: Math.max(u.dataPercent, u.metadataPercent),
    state: u.problem ? 'full' : grew ? 'grown' : 'ok',
    message: u.problem
      ? `thin pool is ${u.problem} (data ${u.dataPercent}%, metadata ${u.metadataPercent}%); ${grew ? 'grown' : 'not grown'}. Disks: ${users.join(', ')}`
      : `pool data ${u.dataPercent}% metadata ${u.metadataPercent}%`,
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// leftovers: transient ids in the running pool that no record holds and, when the pool does not
// run, its files when nothing needs them.

const LEFTOVER_AGE_MS = 60_000;

function olderThan(file: string, ms: number, now: number): boolean {
  try {
    return now - statSync(file).mtimeMs > ms;
  } catch {
    return false;
  }
}

async function thinLeftovers(ctx: LeftoverContext): Promise<Leftover[]> {
  if (ctx.kernel.dmNames.has(THIN_POOL_NAME)) {
    return leftoverThinIds(ctx.config, ctx.entries).map((id) => ({
      kind: 'thin' as const,
      key: String(id),
      device: `/dev/mapper/${THIN_POOL_NAME}`,
      action: `dmsetup message ${THIN_POOL_NAME} 0 "delete ${id}"`,
      why: `transient thin volume id ${id} in the pool that no record holds (left by a crash or a reboot)`,
    }));
  }
  const files = leftoverPoolFiles(ctx.config, ctx.entries, false, ctx.kernel.looped);
  if (!files.every((f) => f.endsWith('.json') || olderThan(f, LEFTOVER_AGE_MS, ctx.now))) return [];
  return files.map((f) => ({
    kind: 'store' as const,
    key: f,
    store: f,
    action: `rm ${f}`,
    why: 'thin pool file with no persistent volume in it, no record and no running pool (left by a crash or a reboot)',
  }));
}

async function isLooped(run: Runner, file: string): Promise<boolean> {
  try {
    return (await loopsBacking(run, fileIdOf(file))).length > 0;
  } catch {
    return false;
  }
}

// ---------------------------------------------------------------------------------------------
// resize: a thin volume's size is its table's length; the pool maps blocks as they are written
// and reads past the base's end return zeros. Reloading the table with another length resizes
// it online. Shrinking is allowed only below no sector the guest wrote: dm-thin reports the
// highest one it mapped.

async function resizeThin(entry: JournalEntry, bytes: number, deps: ResizeDeps): Promise<ResizeResult> {
  const vol = findStep(entry.steps, THIN_STEP.thin, (s) => s.done);
  const dmStep = findStep(entry.steps, 'dm');
  if (!vol || !dmStep)
    throw new GrowError(
      `${diskLabel(entry)} (${entry.backendPath}) is a read-only disk over its base: it is as large as the base image`,
    );
  const name = dmStep.data.name;
  const line = (await dmTableLines(deps.run, name))[0];
  if (!line || line.target !== 'thin')
    throw new GrowError(`${name} is not a thin volume (${line?.target ?? 'no table'})`);
  const before = Number(line.length) * 512;
  const after = wholeMiB(bytes);
  if (after === before) throw new GrowError(`${diskLabel(entry)} is already ${human(before)}`);
  if (after < before) {
    if (!deps.shrink)
      throw new GrowError(`${diskLabel(entry)} is ${human(before)}; ${human(after)} is smaller: give --shrink`);
    const st = parseThinStatus((await dmStatus(deps.run, name))[0]?.params ?? '-');
    if (st.state !== 'ok') throw new GrowError(`${name} reports no mapping (${st.state}); not shrunk`);
    if (st.highestMappedSector !== null && st.highestMappedSector >= BigInt(after / 512)) {
      throw new GrowError(
        `the guest wrote up to sector ${st.highestMappedSector} of ${diskLabel(entry)} (${human(Number(st.highestMappedSector + 1n) * 512)}); ${human(after)} would cut it off: not shrunk`,
      );
    }
  }
  const table = `0 ${after / 512} thin ${line.params}`;
  await dmReload(deps.run, name, table);
  dmStep.data.table = table;
  deps.journal.save(entry);
  if (vol.data.persistent) {
    const key = vol.data.key;
    const lock = await acquireFlock(poolLockPath(deps.config), lockOptions(deps.config, deps.run));
    try {
      const f = poolFiles(deps.config);
      const v = readVolumes(f.volumes);
      const kept = v[key];
      if (kept) {
        v[key] = { ...kept, sectors: after / 512 };
        writeVolumes(f.volumes, v);
      }
    } finally {
      await lock.release();
    }
  }
  const how = `${name} reloaded${vol.data.persistent ? ', the persistent volume keeps the size' : ''}`;
  deps.log.info(`resize ${entry.backendPath} (${diskLabel(entry)}): ${human(before)} → ${human(after)}: ${how}`, {
    action: 'resize',
  });
  return {
    backendPath: entry.backendPath,
    script: entry.script,
    target: name,
    beforeBytes: before,
    afterBytes: after,
    online: true,
    how,
  };
}

/** A persistent volume not attached: its recorded size grows, and its next add uses it. */
async function resizeThinDetached(plan: ThinPlan, bytes: number, deps: ResizeDeps): Promise<ResizeResult> {
  if (plan.readOnly) throw new GrowError(`a read-only block-thin disk is as large as its base ${plan.base}`);
  if (!plan.params.persistent)
    throw new GrowError(
      'a transient block-thin disk exists only while it is attached: resize it through its domain and vdev, or make it persistent',
    );
  const lock = await acquireFlock(poolLockPath(deps.config), lockOptions(deps.config, deps.run));
  try {
    const f = poolFiles(deps.config);
    const v = readVolumes(f.volumes);
    const kept = v[plan.key];
    if (!kept)
      throw new GrowError(
        `the persistent thin volume ${plan.key} does not exist yet: nothing to resize (give its size in the disk's params)`,
      );
    const user = recordsHolding(deps.journal.list().entries, THIN_STEP.thin, { id: kept.id, pool: f.name })[0];
    if (user)
      throw new GrowError(
        `the persistent thin volume ${plan.key} is attached (${user.backendPath}): resize it through its domain and vdev instead`,
      );
    const before = kept.sectors * 512;
    const after = wholeMiB(bytes);
    if (after < before)
      throw new GrowError(
        `the volume is ${human(before)}: a detached volume is never shrunk (attach it, then resize --shrink checks what the guest wrote)`,
      );
    if (after === before) throw new GrowError(`the volume is already ${human(before)}`);
    v[plan.key] = { ...kept, sectors: after / 512 };
    writeVolumes(f.volumes, v);
    const how = `${f.volumes} records the new size; the next add uses it`;
    deps.log.info(`resize of a detached disk: thin volume ${plan.key}: ${human(before)} → ${human(after)}: ${how}`, {
      action: 'resize',
    });
    return {
      backendPath: '',
      script: 'block-thin',
      target: plan.key,
      beforeBytes: before,
      afterBytes: after,
      online: false,
      how,
    };
  } finally {
    await lock.release();
  }
}

/** gc: a leftover id is deleted from the running pool; a leftover pool file, judged again under the pool lock, is deleted. */
async function collectThin(l: Leftover, ctx: CollectContext): Promise<void> {
  if (l.kind === 'thin') return collectThinId(ctx.run, ctx.config, ctx.journal, ctx.log, Number(l.key));
  const lock = await acquireFlock(poolLockPath(ctx.config), lockOptions(ctx.config, ctx.run));
  try {
    const running = (await dmInfo(ctx.run, THIN_POOL_NAME)) !== undefined;
    const f = poolFiles(ctx.config);
    const looped = new Set<string>();
    for (const file of [f.data, f.meta]) if (await isLooped(ctx.run, file)) looped.add(file);
    if (!leftoverPoolFiles(ctx.config, ctx.journal.list().entries, running, (x) => looped.has(x)).includes(l.key))
      throw new Error(`${l.key} is in use now (or gone); left alone`);
    try {
      unlinkSync(l.key);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    }
    ctx.log.info(`gc: deleted leftover thin pool file ${l.key}`);
  } finally {
    await lock.release();
  }
}

/** The pool's traces on the host that no record needs to show: its running device, its devices or files. */
async function poolPresent(deps: { config: Config; run: Runner }): Promise<string[]> {
  const found: string[] = [];
  let running;
  try {
    running = await dmInfo(deps.run, THIN_POOL_NAME);
  } catch {
    running = undefined;
  }
  if (running) found.push(`the device /dev/mapper/${THIN_POOL_NAME} is running`);
  const { dataDevice, metadataDevice } = deps.config.thin;
  if (dataDevice || metadataDevice)
    found.push(
      `it is on the administrator's devices (thin.data_device ${dataDevice || '-'}, thin.metadata_device ${metadataDevice || '-'})`,
    );
  const f = poolFiles(deps.config);
  for (const file of [f.data, f.meta, f.volumes, f.transient]) if (existsSync(file)) found.push(`${file} exists`);
  return found;
}

export const thinBackend: Backend<ThinPlan> = {
  source: (params) => sourceOf(() => parseThinParams(params).base),
  transient: (plan) => (!plan.readOnly && !plan.params.persistent ? `transient thin volume ${plan.name}` : undefined),
  script: 'block-thin',
  summary:
    'thin-provisioned copy-on-write disk: a dm thin volume in one shared pool, with the read-only base image as its external origin',
  usage: [
    `params: ${USAGE_LINE}`,
    '  base-image  absolute path of a disk image (or block device) inside image_dirs; opened read-only;',
    '              it may hold spaces (the words after it are read from the right)',
    "  size        the disk's size: 512 (a bare number is MiB), 512M, 1.5G, 2T; rounded up to whole MiB;",
    "              default the base's size. Past the base's end the disk reads zeros",
    '  persistent  keep the volume after remove and reattach it on the next add of the same domain and vdev',
    'The pool (store_dir/thin-pool.data and .meta, sparse) is created on first use with thin.data_size, thin.metadata_size,',
    'thin.block, and fails writes at once when full (error_if_no_space): run "xen-blockhooks watch" to grow it in time.',
    'With thin.data_device and thin.metadata_device (e.g. two LVs) the pool runs on those instead of files.',
    'xl:  disk = [ "vdev=xvda,access=w,script=block-thin,target=/srv/xen/rootfs.img 20G" ]',
    'xm:  disk = [ "thin:/srv/xen/rootfs.img 20G,xvda,w" ]',
    'access=r hands out a read-only device over the base and needs no pool.',
  ].join('\n'),
  plan: (disk, ctx) => planThin(disk, ctx),
  add: addThin,
  undo: { ...sharedUndo, [THIN_STEP.pool]: undoPool, [THIN_STEP.thin]: undoThin } satisfies UndoRegistry,
  grow(entry, size, deps, opts) {
    if (!usesPool(entry))
      throw new GrowError(`${diskLabel(entry)} (${entry.backendPath}) is a read-only disk: it uses no pool`);
    return growThinPool(opts.part ?? 'data', size, deps, entry.backendPath);
  },
  resize: resizeThin,
  resizeDetached: resizeThinDetached,
  watchShared: watchPool,
  leftovers: thinLeftovers,
  collect: collectThin,
  shared: {
    what: `the thin pool ${THIN_POOL_NAME}`,
    alsoUsedBy: (e) => e.steps.some((s) => s.kind === THIN_STEP.pool || s.kind === THIN_STEP.thin),
    madeBy: (e) => e.steps.some((s) => s.kind === THIN_STEP.pool),
    present: poolPresent,
  },
};
