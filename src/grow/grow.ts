/**
 * Growing copy-on-write space online, before it overflows:
 *
 *   block-cow     the sparse store file is enlarged and its loop device re-read (`losetup -c`);
 *                 dm-snapshot sees the new size at once, no reload.
 *   block-thin    the shared pool: its data (or metadata) file is enlarged, its loop re-read, and
 *                 the pool's table reloaded with the new length (`dmsetup reload` + `resume`).
 *                 A pool that ran out of data space starts taking writes again.
 *   block-lvsnap  `lvextend -L +N` of a classic snapshot; for a thin snapshot, of its LVM pool
 *                 (data, or `--poolmetadatasize +N` for metadata).
 *
 * A snapshot the kernel already dropped (`Invalid`, `Overflow`) cannot be saved by growing: that
 * is an error here, never a silent skip. Every action is logged. Callers serialise with the hooks:
 * `growStore` expects the caller to hold the disk's backend-path lock (the CLI does); the pool
 * work takes the pool lock itself. `watchOnce` (watch.ts) takes both.
 */
import { lstatSync, statSync, truncateSync } from 'node:fs';
import type { Config } from '../config/config.js';
import { dmInfo, dmReload, dmStatus, dmTable, parseSnapshotStatus, type SnapshotStatus } from '../devices/dmsetup.js';
import { loopsBacking, resizeLoop } from '../devices/losetup.js';
import { lvExtendBy, lvExtendPoolMetadataBy, lvExtendTo, lvInfo, type LvInfo, type LvRef } from '../devices/lvm.js';
import type { Runner } from '../devices/runner.js';
import { deviceSectors, devString, fileIdOf } from '../devices/sysfs.js';
import { poolSectors, poolStatus, poolUsage, type PoolUsage } from '../devices/thin.js';
import type { JournalEntry } from '../journal/journal.js';
import { acquireFlock } from '../lock/flock.js';
import { lockOptions, thinPoolLockPath } from '../lock/paths.js';
import type { Logger } from '../log/logger.js';
import { LVSNAP_STEP } from '../backends/lvsnap.js';
import { poolDevice, poolFiles, poolOnDevices, THIN_POOL_NAME, THIN_STEP } from '../backends/thin.js';

export class GrowError extends Error {
  override name = 'GrowError';
}

/** `+512M` (relative) or `4G` (the new total), as the CLI parses it. */
export interface GrowSize {
  relative: boolean;
  bytes: number;
}

export interface GrowDeps {
  config: Config;
  run: Runner;
  log: Logger;
}

export interface GrowAction {
  backendPath: string;
  script: string;
  /** What grew: a store file, the pool's data or metadata, an LV. */
  kind: 'cow-store' | 'thin-data' | 'thin-metadata' | 'lv' | 'lv-pool-data' | 'lv-pool-metadata';
  /** The file or LV that grew. */
  target: string;
  beforeBytes: number;
  afterBytes: number;
}

const MiB = 1048576;
/** dm-thin uses at most this much metadata (THIN_METADATA_MAX_SECTORS, 255 * 2^14 * 8 sectors). */
export const THIN_METADATA_MAX_BYTES = 255 * 16384 * 8 * 512;

function human(n: number): string {
  if (n >= 1024 * MiB && n % (1024 * MiB) === 0) return `${n / (1024 * MiB)} GiB`;
  if (n >= MiB) return `${Math.round((n / MiB) * 10) / 10} MiB`;
  return `${n} B`;
}

function label(entry: JournalEntry): string {
  return `${entry.disk.domainName ?? entry.disk.frontendId ?? '?'}/${entry.disk.vdev ?? '?'}`;
}

/** The new size: `size` applied to `current`, or `current` grown by the configured step. */
export function targetBytes(current: number, size: GrowSize | undefined, stepPercent: number, align: number): number {
  let t: number;
  if (size === undefined) t = current + Math.max(align, Math.ceil((current * stepPercent) / 100));
  else t = size.relative ? current + size.bytes : size.bytes;
  return Math.ceil(t / align) * align;
}

// ---------------------------------------------------------------------------------------------
// block-cow

export interface CowParts {
  dmName: string;
  storeFile: string;
  loop: string | undefined;
}

/** The snapshot and its store as block-cow recorded them, or undefined for a read-only disk. */
export function cowParts(entry: JournalEntry): CowParts | undefined {
  const dm = entry.steps.find((s) => s.kind === 'dm' && s.data.readOnly !== true && typeof s.data.name === 'string');
  const store = entry.steps.find((s) => s.kind === 'store-file' && typeof s.data.path === 'string');
  if (!dm || !store) return undefined;
  const loopStep = entry.steps.find((s) => s.kind === 'loop' && s.data.file === store.data.path);
  return { dmName: dm.data.name as string, storeFile: store.data.path as string, loop: typeof loopStep?.data.loop === 'string' ? loopStep.data.loop : undefined };
}

export async function snapshotState(run: Runner, name: string): Promise<SnapshotStatus> {
  const l = (await dmStatus(run, name))[0];
  if (!l || l.target !== 'snapshot') throw new GrowError(`${name} is not a snapshot device (${l?.target ?? 'no table'})`);
  return parseSnapshotStatus(l.params);
}

function droppedMessage(name: string, s: SnapshotStatus): string {
  return `${name} is ${s.state === 'invalid' ? 'Invalid' : s.state}: its copy-on-write store overflowed and the kernel dropped the snapshot; growing cannot bring it back (the disk must be removed and added again, its changes are lost)`;
}

export async function growCowStore(entry: JournalEntry, size: GrowSize | undefined, deps: GrowDeps): Promise<GrowAction> {
  const p = cowParts(entry);
  if (!p) throw new GrowError(`${label(entry)} (${entry.backendPath}) has no copy-on-write store (a read-only disk?)`);
  const s = await snapshotState(deps.run, p.dmName);
  if (s.state !== 'active') throw new GrowError(droppedMessage(p.dmName, s));
  const st = lstatSync(p.storeFile, { bigint: true });
  if (!st.isFile()) throw new GrowError(`${p.storeFile} is not a regular file`);
  const loops = await loopsBacking(deps.run, { dev: devString(st.dev), ino: st.ino.toString() });
  const loop = loops.find((l) => l.name === p.loop) ?? loops[0];
  if (!loop) throw new GrowError(`no loop device serves the store ${p.storeFile} of ${entry.backendPath}`);
  const before = Number(st.size);
  const after = targetBytes(before, size, deps.config.watch.stepPercent, MiB);
  if (after <= before) throw new GrowError(`${p.storeFile} is already ${human(before)}; ${human(after)} is not larger (stores never shrink)`);
  truncateSync(p.storeFile, after);
  await resizeLoop(deps.run, loop.name);
  deps.log.info(`grow ${entry.backendPath} (${label(entry)}): store ${p.storeFile} ${human(before)} → ${human(after)}, ${loop.name} re-read`, { action: 'grow', kind: 'cow-store' });
  return { backendPath: entry.backendPath, script: entry.script, kind: 'cow-store', target: p.storeFile, beforeBytes: before, afterBytes: after };
}

// ---------------------------------------------------------------------------------------------
// block-thin: the pool

function loopOf(run: Runner, file: string) {
  return async () => {
    const l = (await loopsBacking(run, fileIdOf(file)))[0];
    if (!l) throw new GrowError(`no loop device serves the pool file ${file}`);
    return l.name;
  };
}

/** Reload the pool's own table with `length` sectors (or unchanged) and resume: the pool picks up both devices' sizes. */
async function reloadPool(run: Runner, name: string, length?: bigint): Promise<void> {
  const t = await dmTable(run, name);
  if (!t || t.target !== 'thin-pool') throw new GrowError(`${name} is not a thin pool`);
  await dmReload(run, name, `0 ${length ?? t.length} thin-pool ${t.params}`);
}

/**
 * Grow the shared pool's data (default) or metadata, under the pool lock. Works on a pool that is
 * out of data space too: that is how a full pool is recovered.
 */
export async function growThinPool(part: 'data' | 'metadata', size: GrowSize | undefined, deps: GrowDeps, who = 'pool'): Promise<GrowAction> {
  const f = poolFiles(deps.config);
  const lock = await acquireFlock(thinPoolLockPath(deps.config.stateDir, THIN_POOL_NAME), lockOptions(deps.config, deps.run));
  try {
    if (!(await dmInfo(deps.run, f.name))) throw new GrowError(`the thin pool ${f.name} is not running`);
    const s = await poolStatus(deps.run, f.name);
    if (s.state !== 'ok') throw new GrowError(`the thin pool ${f.name} has failed (status ${s.state === 'fail' ? 'Fail' : 'Error'}); growing cannot repair it: run thin_check on its metadata`);
    if (poolOnDevices(deps.config)) return await growPoolDevice(part, size, deps, who);
    const file = part === 'data' ? f.data : f.meta;
    const before = statSync(file).size;
    const align = part === 'data' ? deps.config.thin.blockKiB * 1024 : MiB;
    let after = targetBytes(before, size, deps.config.watch.stepPercent, align);
    if (part === 'metadata') after = Math.min(after, THIN_METADATA_MAX_BYTES);
    if (after <= before) throw new GrowError(`the pool's ${part} file ${file} is already ${human(before)}; ${human(after)} is not larger${part === 'metadata' && before >= THIN_METADATA_MAX_BYTES ? ' (dm-thin\'s metadata limit)' : ''}`);
    const loop = await loopOf(deps.run, file)();
    truncateSync(file, after);
    await resizeLoop(deps.run, loop);
    await reloadPool(deps.run, f.name, part === 'data' ? poolSectors(after, deps.config.thin.blockKiB) : undefined);
    const u = poolUsage(await poolStatus(deps.run, f.name));
    deps.log.info(`grow ${who}: thin pool ${f.name} ${part} ${file} ${human(before)} → ${human(after)}, reloaded; now data ${u.dataPercent}% metadata ${u.metadataPercent}%${u.problem ? `, ${u.problem}` : ''}`, { action: 'grow', kind: `thin-${part}` });
    return { backendPath: who, script: 'block-thin', kind: part === 'data' ? 'thin-data' : 'thin-metadata', target: file, beforeBytes: before, afterBytes: after };
  } finally {
    await lock.release();
  }
}

/**
 * The pool on devices (thin.data_device / thin.metadata_device): `lvextend` the device to the new
 * size (LVM rounds up to whole extents), then reload the pool. A device that is not an LV cannot
 * be grown here: lvextend's refusal says so. Caller holds the pool lock.
 */
async function growPoolDevice(part: 'data' | 'metadata', size: GrowSize | undefined, deps: GrowDeps, who: string): Promise<GrowAction> {
  const f = poolFiles(deps.config);
  const device = part === 'data' ? deps.config.thin.dataDevice : deps.config.thin.metadataDevice;
  const bytesOf = () => {
    const d = poolDevice(device, part);
    return deviceSectors(d.major, d.minor) * 512;
  };
  const before = bytesOf();
  const align = part === 'data' ? deps.config.thin.blockKiB * 1024 : MiB;
  let after = targetBytes(before, size, deps.config.watch.stepPercent, align);
  if (part === 'metadata') after = Math.min(after, THIN_METADATA_MAX_BYTES);
  if (after <= before) throw new GrowError(`the pool's ${part} device ${device} is already ${human(before)}; ${human(after)} is not larger${part === 'metadata' && before >= THIN_METADATA_MAX_BYTES ? ' (dm-thin\'s metadata limit)' : ''}`);
  await lvExtendTo(deps.run, device, after);
  const grown = bytesOf();
  await reloadPool(deps.run, f.name, part === 'data' ? poolSectors(grown, deps.config.thin.blockKiB) : undefined);
  const u = poolUsage(await poolStatus(deps.run, f.name));
  deps.log.info(`grow ${who}: thin pool ${f.name} ${part} ${device} ${human(before)} → ${human(grown)} (lvextend), reloaded; now data ${u.dataPercent}% metadata ${u.metadataPercent}%${u.problem ? `, ${u.problem}` : ''}`, { action: 'grow', kind: `thin-${part}` });
  return { backendPath: who, script: 'block-thin', kind: part === 'data' ? 'thin-data' : 'thin-metadata', target: device, beforeBytes: before, afterBytes: grown };
}

export async function thinPoolUsage(run: Runner, config: Config): Promise<PoolUsage | undefined> {
  const f = poolFiles(config);
  if (!(await dmInfo(run, f.name))) return undefined;
  return poolUsage(await poolStatus(run, f.name));
}

// ---------------------------------------------------------------------------------------------
// block-lvsnap

export function lvsnapRef(entry: JournalEntry): LvRef | undefined {
  const s = entry.steps.find((x) => x.kind === LVSNAP_STEP);
  return s && typeof s.data.vg === 'string' && typeof s.data.lv === 'string' ? { vg: s.data.vg, lv: s.data.lv } : undefined;
}

function lvDropped(l: LvInfo): string {
  return `${l.vg}/${l.lv} is Invalid (attr ${l.attr}): its copy-on-write area overflowed and the kernel dropped the snapshot; lvextend cannot bring it back (the disk must be removed and added again, its changes are lost)`;
}

export async function growLv(entry: JournalEntry, size: GrowSize | undefined, deps: GrowDeps, part: 'data' | 'metadata' = 'data'): Promise<GrowAction> {
  const ref = lvsnapRef(entry);
  if (!ref) throw new GrowError(`${label(entry)} (${entry.backendPath}) has no snapshot (a read-only disk?)`);
  const snap = await lvInfo(deps.run, ref);
  if (!snap) throw new GrowError(`${ref.vg}/${ref.lv} does not exist any more`);
  if (snap.invalid) throw new GrowError(lvDropped(snap));
  const thin = snap.kind === 'thin';
  let target: LvRef = ref;
  let before = Number(snap.sizeBytes);
  if (thin) {
    if (!snap.pool) throw new GrowError(`${ref.vg}/${ref.lv} is a thin volume without a pool`);
    target = { vg: ref.vg, lv: snap.pool };
    const pool = await lvInfo(deps.run, target);
    if (!pool) throw new GrowError(`the pool ${ref.vg}/${snap.pool} of ${ref.vg}/${ref.lv} is not there`);
    before = Number(pool.sizeBytes);
  }
  if (part === 'metadata' && !thin) throw new GrowError(`${ref.vg}/${ref.lv} is a classic snapshot: it has no pool metadata to grow`);
  const add = size === undefined ? Math.max(MiB, Math.ceil((before * deps.config.watch.stepPercent) / 100)) : size.relative ? size.bytes : size.bytes - before;
  if (add <= 0) throw new GrowError(`${target.vg}/${target.lv} is already ${human(before)}; ${human(size?.bytes ?? 0)} is not larger`);
  const addMiB = Math.ceil(add / MiB);
  if (part === 'metadata') await lvExtendPoolMetadataBy(deps.run, target, addMiB);
  else await lvExtendBy(deps.run, target, addMiB);
  const now = await lvInfo(deps.run, target);
  const after = now ? Number(now.sizeBytes) : before + addMiB * MiB;
  const kind = !thin ? 'lv' : part === 'data' ? 'lv-pool-data' : 'lv-pool-metadata';
  deps.log.info(`grow ${entry.backendPath} (${label(entry)}): ${thin ? `thin pool ${target.vg}/${target.lv} ${part}` : `snapshot ${ref.vg}/${ref.lv}`} +${addMiB} MiB (lvextend)${part === 'data' ? `, ${human(before)} → ${human(after)}` : ''}`, { action: 'grow', kind });
  return { backendPath: entry.backendPath, script: entry.script, kind, target: `${target.vg}/${target.lv}`, beforeBytes: before, afterBytes: after };
}

// ---------------------------------------------------------------------------------------------
// one entry point for the CLI

/**
 * Grow what backs one disk: block-cow its store file, block-thin the shared pool's data (the
 * pool is what fills; a thin volume itself never overflows), block-lvsnap its snapshot (or the
 * thin pool under a thin snapshot). `size` undefined = by watch.step percent. The caller holds the
 * disk's backend-path lock.
 */
export async function growStore(entry: JournalEntry, size: GrowSize | undefined, deps: GrowDeps, opts: { part?: 'data' | 'metadata' } = {}): Promise<GrowAction> {
  if (entry.phase !== 'ready') throw new GrowError(`${entry.backendPath} is ${entry.phase}, not ready; grow it once the add has finished`);
  switch (entry.script) {
    case 'block-cow':
      return growCowStore(entry, size, deps);
    case 'block-thin':
      if (!entry.steps.some((s) => s.kind === THIN_STEP.pool)) throw new GrowError(`${label(entry)} (${entry.backendPath}) is a read-only disk: it uses no pool`);
      return growThinPool(opts.part ?? 'data', size, deps, entry.backendPath);
    case 'block-lvsnap':
      return growLv(entry, size, deps, opts.part ?? 'data');
    default:
      throw new GrowError(`growing is not supported for ${entry.script} (${entry.backendPath}); nothing was changed`);
  }
}
