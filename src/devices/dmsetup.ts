/**
 * dmsetup(8): argv builders, table builders, status/info parsers, and a bounded `remove`.
 *
 * Tables name devices by decimal `major:minor` (what `decimalDevice` gives), so they work
 * without udev and without /dev/mapper nodes; a table is one argv element after `--table`.
 * Device names are ours: they are checked (no whitespace, no `/`, no leading `-`, at most 127
 * bytes) rather than quoted. Status formats are the kernel's (dm-snap.c snapshot_status,
 * dm-thin.c pool_status/thin_status, Documentation/admin-guide/device-mapper/).
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { CommandError, type Runner } from './runner.js';
import { readdirSync, readFileSync } from 'node:fs';
import { decimalDevice, type MajorMinor } from './sysfs.js';

// ---------------------------------------------------------------------------------------------
// Names and device references

const DM_NAME = /^[A-Za-z0-9_+.:@=][A-Za-z0-9_+.:@=-]{0,126}$/;

export function checkDmName(name: string): string {
  if (!DM_NAME.test(name)) throw new Error(`invalid device-mapper name ${JSON.stringify(name)}`);
  return name;
}

/** A device in a table: `{major, minor}` (preferred) or a path / `maj:min` without whitespace. */
export type DevRef = MajorMinor | string;

export function devRef(d: DevRef): string {
  if (typeof d !== 'string') return decimalDevice(d);
  if (!/^(\/\S+|\d+:\d+)$/.test(d)) throw new Error(`invalid device in a dm table: ${JSON.stringify(d)}`);
  return d;
}

function sectors(n: number | bigint, what: string, min = 0n): string {
  const v = BigInt(n);
  if (v < min) throw new Error(`${what} must be >= ${min}, got ${v}`);
  return v.toString();
}

// ---------------------------------------------------------------------------------------------
// Table lines (one target each: "<start> <length> <target> <args>")

export interface Extent {
  /** Length in 512-byte sectors. */
  length: number | bigint;
  /** Start sector in the mapped device (default 0). */
  start?: number | bigint;
}

function line(e: Extent, target: string, args: string[]): string {
  return [sectors(e.start ?? 0, 'start'), sectors(e.length, 'length', 1n), target, ...args].join(' ');
}

export function linearTable(e: Extent, dev: DevRef, offset: number | bigint = 0): string {
  return line(e, 'linear', [devRef(dev), sectors(offset, 'offset')]);
}

/**
 * `snapshot <origin> <cow> P|N|PO|NO <chunk>`; chunk in sectors, a power of two. With
 * `overflow` a full store reports `Overflow` and keeps what it has (reads still work) instead of
 * invalidating the whole snapshot.
 */
export function snapshotTable(
  e: Extent,
  origin: DevRef,
  cow: DevRef,
  opts: { persistent: boolean; chunkSectors: number; overflow?: boolean },
): string {
  const c = opts.chunkSectors;
  if (!Number.isInteger(c) || c < 8 || (c & (c - 1)) !== 0)
    throw new Error(`snapshot chunk must be a power of two >= 8 sectors, got ${c}`);
  return line(e, 'snapshot', [
    devRef(origin),
    devRef(cow),
    (opts.persistent ? 'P' : 'N') + (opts.overflow ? 'O' : ''),
    String(c),
  ]);
}

export function snapshotOriginTable(e: Extent, origin: DevRef): string {
  return line(e, 'snapshot-origin', [devRef(origin)]);
}

export interface ThinPoolOptions {
  /** Data block size in sectors: a multiple of 128 (64 KiB) between 128 and 2097152. */
  blockSectors: number;
  /** Free data blocks below which the kernel raises a dm event. */
  lowWaterBlocks: number | bigint;
  skipBlockZeroing?: boolean;
  ignoreDiscard?: boolean;
  noDiscardPassdown?: boolean;
  readOnly?: boolean;
  /** Fail writes at once when the pool is full instead of queueing them for 60 s. */
  errorIfNoSpace?: boolean;
}

export function thinPoolTable(e: Extent, metadata: DevRef, data: DevRef, o: ThinPoolOptions): string {
  const b = o.blockSectors;
  if (!Number.isInteger(b) || b < 128 || b > 2097152 || b % 128 !== 0)
    throw new Error(`thin-pool block size must be a multiple of 128 sectors in 128..2097152, got ${b}`);
  const features = [
    ...(o.skipBlockZeroing ? ['skip_block_zeroing'] : []),
    ...(o.ignoreDiscard ? ['ignore_discard'] : []),
    ...(o.noDiscardPassdown ? ['no_discard_passdown'] : []),
    ...(o.readOnly ? ['read_only'] : []),
    ...(o.errorIfNoSpace ? ['error_if_no_space'] : []),
  ];
  return line(e, 'thin-pool', [
    devRef(metadata),
    devRef(data),
    String(b),
    sectors(o.lowWaterBlocks, 'low water mark'),
    String(features.length),
    ...features,
  ]);
}

/** `thin <pool dev> <dev id> [<external origin dev>]` */
export function thinTable(e: Extent, pool: DevRef, devId: number, externalOrigin?: DevRef): string {
  if (!Number.isInteger(devId) || devId < 0 || devId > 0xffffff)
    throw new Error(`thin device id must be 0..16777215, got ${devId}`);
  return line(e, 'thin', [
    devRef(pool),
    String(devId),
    ...(externalOrigin === undefined ? [] : [devRef(externalOrigin)]),
  ]);
}

export function zeroTable(e: Extent): string {
  return line(e, 'zero', []);
}

export function errorTable(e: Extent): string {
  return line(e, 'error', []);
}

// ---------------------------------------------------------------------------------------------
// argv builders

/**
 * One target line, or two separated by a newline (a device made of two ranges). Never more:
 * dmsetup before 2.03.17 splits a --table at its first newline only.
 */
function checkTable(table: string): string {
  const lines = table.split('\n');
  if (lines.length > 2 || lines.some((l) => l.trim() === '' || /[\r\0;]/.test(l)))
    throw new Error(`invalid dm table ${JSON.stringify(table)}`);
  return table;
}

export interface CreateOptions {
  readOnly?: boolean;
  uuid?: string;
}

export function createArgs(name: string, table: string, o: CreateOptions = {}): string[] {
  const uuid = o.uuid === undefined ? [] : ['--uuid', checkDmName(o.uuid)];
  return [
    'create',
    ...(o.readOnly ? ['--readonly'] : []),
    ...uuid,
    '--table',
    checkTable(table),
    '--',
    checkDmName(name),
  ];
}

export function removeArgs(name: string): string[] {
  return ['remove', '--', checkDmName(name)];
}

export function suspendArgs(name: string, o: { noFlush?: boolean } = {}): string[] {
  return ['suspend', ...(o.noFlush ? ['--noflush'] : []), checkDmName(name)];
}

export function resumeArgs(name: string): string[] {
  return ['resume', checkDmName(name)];
}

/** Load an inactive table; it takes effect at the next resume. */
export function reloadArgs(name: string, table: string): string[] {
  return ['reload', checkDmName(name), '--table', checkTable(table)];
}

/** `dmsetup message NAME SECTOR WORDS...` (e.g. thin-pool `create_thin 0`). */
export function messageArgs(name: string, sector: number, ...words: string[]): string[] {
  if (words.length === 0 || words.some((w) => w === '' || /\s/.test(w)))
    throw new Error(`invalid dm message ${JSON.stringify(words)}`);
  return ['message', checkDmName(name), String(sector), ...words];
}

export function statusArgs(name?: string, o: { target?: string } = {}): string[] {
  return ['status', ...(o.target ? ['--target', o.target] : []), ...(name === undefined ? [] : [checkDmName(name)])];
}

export function tableArgs(name?: string): string[] {
  return ['table', ...(name === undefined ? [] : [checkDmName(name)])];
}

export const INFO_COLUMNS = 'name,major,minor,open,attr';

/** Every device, one line each (parseInfo). */
export function infoArgs(): string[] {
  return ['info', '-c', '--noheadings', '-o', INFO_COLUMNS];
}

/** One device, with its uuid: `name|major|minor|open|uuid` (dmInfo). */
export function infoOneArgs(name: string): string[] {
  return [
    'info',
    '-c',
    '--noheadings',
    '--separator',
    '|',
    '-o',
    'name,major,minor,open,uuid',
    '--',
    checkDmName(name),
  ];
}

export function lsArgs(): string[] {
  return ['ls'];
}

/** Create missing /dev/mapper nodes (without udev). */
export function mknodesArgs(name?: string): string[] {
  return ['mknodes', ...(name === undefined ? [] : [checkDmName(name)])];
}

// ---------------------------------------------------------------------------------------------
// Parsers

export interface StatusLine {
  /** Present when dmsetup listed several devices (`name: start length target params`). */
  name?: string;
  start: bigint;
  length: bigint;
  target: string;
  params: string;
}

/** `dmsetup status` or `dmsetup table` output, one entry per target line. */
export function parseStatus(text: string): StatusLine[] {
  const out: StatusLine[] = [];
  for (const raw of text.split('\n')) {
    const l = raw.trimEnd();
    if (l === '' || l === 'No devices found') continue;
    const m = /^(?:(\S+):\s+)?(\d+)\s+(\d+)\s+(\S+)(?:\s+(.*))?$/.exec(l);
    if (!m) throw new Error(`unexpected dmsetup status line: ${JSON.stringify(l)}`);
    out.push({
      ...(m[1] === undefined ? {} : { name: m[1] }),
      start: BigInt(m[2]!),
      length: BigInt(m[3]!),
      target: m[4]!,
      params: (m[5] ?? '').trim(),
    });
  }
  return out;
}

export type SnapshotStatus =
  | { state: 'active'; allocatedSectors: bigint; totalSectors: bigint; metadataSectors: bigint }
  | { state: 'invalid' | 'overflow' | 'merge-failed' | 'unknown' };

/** snapshot target params: `A/B M`, `Invalid`, `Overflow`, `Merge failed`, `Unknown`. */
export function parseSnapshotStatus(params: string): SnapshotStatus {
  const p = params.trim();
  const m = /^(\d+)\/(\d+) (\d+)$/.exec(p);
  if (m)
    return {
      state: 'active',
      allocatedSectors: BigInt(m[1]!),
      totalSectors: BigInt(m[2]!),
      metadataSectors: BigInt(m[3]!),
    };
  switch (p) {
    case 'Invalid':
      return { state: 'invalid' };
    case 'Overflow':
      return { state: 'overflow' };
    case 'Merge failed':
      return { state: 'merge-failed' };
    case 'Unknown':
      return { state: 'unknown' };
  }
  throw new Error(`unexpected snapshot status: ${JSON.stringify(params)}`);
}

export type ThinPoolStatus =
  | {
      state: 'ok';
      transactionId: bigint;
      usedMetadataBlocks: bigint;
      totalMetadataBlocks: bigint;
      usedDataBlocks: bigint;
      totalDataBlocks: bigint;
      heldMetadataRoot: bigint | null;
      mode: 'rw' | 'ro' | 'out_of_data_space';
      discard: 'discard_passdown' | 'no_discard_passdown' | 'ignore_discard';
      noSpace: 'error_if_no_space' | 'queue_if_no_space';
      needsCheck: boolean;
      metadataLowWatermark: bigint | null;
    }
  | { state: 'fail' | 'error' };

/**
 * thin-pool params: `<transaction id> <used meta>/<total meta> <used data>/<total data>
 * <held root>|- rw|ro|out_of_data_space <discard> error|queue_if_no_space needs_check|-
 * [<metadata low watermark>]`, or `Fail` / `Error`.
 */
export function parseThinPoolStatus(params: string): ThinPoolStatus {
  const p = params.trim();
  if (p === 'Fail') return { state: 'fail' };
  if (p === 'Error') return { state: 'error' };
  const w = p.split(/\s+/);
  const [tid, meta, data, held, mode, discard, noSpace, check, lowWater] = w;
  const mm = /^(\d+)\/(\d+)$/.exec(meta ?? '');
  const dm = /^(\d+)\/(\d+)$/.exec(data ?? '');
  if (
    !/^\d+$/.test(tid ?? '') ||
    !mm ||
    !dm ||
    !/^(\d+|-)$/.test(held ?? '') ||
    !(mode === 'rw' || mode === 'ro' || mode === 'out_of_data_space') ||
    !(discard === 'discard_passdown' || discard === 'no_discard_passdown' || discard === 'ignore_discard') ||
    !(noSpace === 'error_if_no_space' || noSpace === 'queue_if_no_space') ||
    !(check === 'needs_check' || check === '-') ||
    !(lowWater === undefined || /^\d+$/.test(lowWater)) ||
    w.length > 9
  ) {
    throw new Error(`unexpected thin-pool status: ${JSON.stringify(params)}`);
  }
  return {
    state: 'ok',
    transactionId: BigInt(tid!),
    usedMetadataBlocks: BigInt(mm[1]!),
    totalMetadataBlocks: BigInt(mm[2]!),
    usedDataBlocks: BigInt(dm[1]!),
    totalDataBlocks: BigInt(dm[2]!),
    heldMetadataRoot: held === '-' ? null : BigInt(held!),
    mode,
    discard,
    noSpace,
    needsCheck: check === 'needs_check',
    metadataLowWatermark: lowWater === undefined ? null : BigInt(lowWater),
  };
}

export type ThinStatus =
  | { state: 'ok'; mappedSectors: bigint; highestMappedSector: bigint | null }
  | { state: 'fail' | 'error' | 'no-device' };

/** thin params: `<mapped sectors> <highest mapped sector>|-`, `Fail`, `Error`, or `-`. */
export function parseThinStatus(params: string): ThinStatus {
  const p = params.trim();
  if (p === 'Fail') return { state: 'fail' };
  if (p === 'Error') return { state: 'error' };
  if (p === '-') return { state: 'no-device' };
  const m = /^(\d+) (\d+|-)$/.exec(p);
  if (!m) throw new Error(`unexpected thin status: ${JSON.stringify(params)}`);
  return { state: 'ok', mappedSectors: BigInt(m[1]!), highestMappedSector: m[2] === '-' ? null : BigInt(m[2]!) };
}

export interface DmInfo {
  name: string;
  major: number;
  minor: number;
  openCount: number;
  live: boolean;
  inactiveTable: boolean;
  suspended: boolean;
  readOnly: boolean;
}

/** `dmsetup info -c --noheadings -o name,major,minor,open,attr` (separator `:`). */
export function parseInfo(text: string): DmInfo[] {
  const out: DmInfo[] = [];
  for (const raw of text.split('\n')) {
    const l = raw.trim();
    if (l === '' || l === 'No devices found') continue;
    // The name may contain ':'; the last four fields cannot.
    const m = /^(.+):(\d+):(\d+):(\d+):([L-][I-][s-][rw])$/.exec(l);
    if (!m) throw new Error(`unexpected dmsetup info line: ${JSON.stringify(l)}`);
    const attr = m[5]!;
    out.push({
      name: m[1]!,
      major: Number(m[2]),
      minor: Number(m[3]),
      openCount: Number(m[4]),
      live: attr[0] === 'L',
      inactiveTable: attr[1] === 'I',
      suspended: attr[2] === 's',
      readOnly: attr[3] === 'r',
    });
  }
  return out;
}

/** `dmsetup ls`: `name\t(major, minor)` or `name\t(major:minor)` lines. */
export function parseLs(text: string): { name: string; major: number; minor: number }[] {
  const out: { name: string; major: number; minor: number }[] = [];
  for (const raw of text.split('\n')) {
    const l = raw.trim();
    if (l === '' || l === 'No devices found') continue;
    const m = /^(\S+)\s+\((\d+)(?:, |:)(\d+)\)$/.exec(l);
    if (!m) throw new Error(`unexpected dmsetup ls line: ${JSON.stringify(l)}`);
    out.push({ name: m[1]!, major: Number(m[2]), minor: Number(m[3]) });
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Helpers over a Runner

// The last alternative is a kernel without device-mapper at all: then no dm device can exist
// either, so a remove or an info of one has nothing to find (an add fails before it built one).
const NOT_THERE =
  /No such device or address|^Device .* not found$|Device does not exist|Failure to communicate with kernel device-mapper driver/m;
const BUSY = /busy/i;
const NO_DM =
  /No such device|Failure to communicate with kernel device-mapper|\/proc\/misc: No entry for device-mapper/;

export function isNoSuchDevice(stderr: string): boolean {
  return NOT_THERE.test(stderr);
}

/** One device as dmInfo reports it. */
export interface DmDevice {
  name: string;
  major: number;
  minor: number;
  open: number;
  uuid: string;
}

/** `dmsetup info` of one device (infoOneArgs), or undefined when there is no such device. */
export async function dmInfo(run: Runner, name: string): Promise<DmDevice | undefined> {
  const r = await run.probe('dmsetup', infoOneArgs(name));
  if (r.failed) {
    if (isNoSuchDevice(r.stderr) || /does not exist/i.test(r.stderr)) return undefined;
    throw new CommandError(r);
  }
  const f = r.stdout.trim().split('|');
  if (f.length < 5 || !/^\d+$/.test(f[1] ?? '') || !/^\d+$/.test(f[2] ?? ''))
    throw new Error(`dmsetup info ${name}: cannot read "${r.stdout.trim()}"`);
  return {
    name: f[0] as string,
    major: Number(f[1]),
    minor: Number(f[2]),
    open: Number(f[3]) || 0,
    uuid: f.slice(4).join('|'),
  };
}

/** Every device (infoArgs), or `available: false` on a kernel without device-mapper. */
export async function dmList(run: Runner): Promise<{ available: boolean; devices: DmInfo[] }> {
  const r = await run.probe('dmsetup', infoArgs());
  if (r.failed) {
    if (NO_DM.test(r.stderr) || r.exitCode === undefined) return { available: false, devices: [] };
    throw new Error(`${r.command} failed: ${r.stderr.trim().split('\n').pop() ?? ''}`);
  }
  return { available: true, devices: parseInfo(r.stdout) };
}

export async function dmStatus(run: Runner, name: string): Promise<StatusLine[]> {
  return parseStatus((await run.run('dmsetup', statusArgs(name))).stdout);
}

/** The device's table (its first line), or undefined when it has none. */
export async function dmTable(run: Runner, name: string): Promise<StatusLine | undefined> {
  return (await dmTableLines(run, name))[0];
}

/** Every target line of the device's live table. */
export async function dmTableLines(run: Runner, name: string): Promise<StatusLine[]> {
  return parseStatus((await run.run('dmsetup', tableArgs(name))).stdout);
}

/** `dmsetup table` and `dmsetup status` of every device, by name. */
export async function dmTablesAndStatus(run: Runner): Promise<{ tables: string; status: string }> {
  const [t, st] = await Promise.all([run.run('dmsetup', tableArgs()), run.run('dmsetup', statusArgs())]);
  return { tables: t.stdout, status: st.stdout };
}

/** Load `table` into the device's inactive slot and resume it: the new table goes live. */
export async function dmReload(run: Runner, name: string, table: string): Promise<void> {
  await run.run('dmsetup', reloadArgs(name, table));
  await run.run('dmsetup', resumeArgs(name));
}

/** `dmsetup mknodes NAME`: its /dev/mapper node, where no udev made it; a failure is the caller's to notice (the node is still missing). */
export async function dmMknodes(run: Runner, name: string): Promise<void> {
  await run.probe('dmsetup', mknodesArgs(name));
}

/** Create the device and return its info (it must be there right after). */
export async function dmCreate(run: Runner, name: string, table: string, o: CreateOptions = {}): Promise<DmDevice> {
  await run.run('dmsetup', createArgs(name, table, o));
  const info = await dmInfo(run, name);
  if (!info) throw new Error(`dm device ${name} is missing right after dmsetup create`);
  return info;
}

/** `dmsetup message NAME SECTOR WORDS…` through probe: the caller reads the outcome. */
export async function dmMessage(run: Runner, name: string, sector: number, ...words: string[]) {
  return run.probe('dmsetup', messageArgs(name, sector, ...words));
}

/** The dm names (else kernel names) of the devices stacked on dm device `name` (sysfs holders). */
async function holderNames(run: Runner, name: string): Promise<string[]> {
  const info = await dmInfo(run, name).catch(() => undefined);
  if (!info) return [];
  let holders: string[];
  try {
    holders = readdirSync(`${run.sysRoot ?? '/sys'}/dev/block/${info.major}:${info.minor}/holders`);
  } catch {
    return [];
  }
  return holders.map((h) => {
    try {
      return readFileSync(`${run.sysRoot ?? '/sys'}/class/block/${h}/dm/name`, 'utf8').trim() || h;
    } catch {
      return h;
    }
  });
}

/**
 * Remove dm device `name`, retrying while it is busy (blkback lets go of a device
 * asynchronously) for up to `busyRetryMs`. A device that is already gone is fine.
 */
export async function dmRemove(run: Runner, name: string, busyRetryMs: number): Promise<void> {
  const deadline = Date.now() + busyRetryMs;
  for (let delay = 50; ; delay = Math.min(delay * 2, 500)) {
    const r = await run.probe('dmsetup', removeArgs(name));
    if (!r.failed) return;
    if (isNoSuchDevice(r.stderr) || /does not exist/i.test(r.stderr)) {
      if (!(await dmInfo(run, name))) return;
    }
    if (!BUSY.test(r.stderr) || Date.now() >= deadline) {
      const e = new CommandError(r);
      if (BUSY.test(r.stderr)) {
        const held = await holderNames(run, name);
        throw new Error(
          `${e.message} (still busy after ${busyRetryMs} ms: ${held.length ? `${held.join(', ')} ${held.length === 1 ? 'sits' : 'sit'} on it (partitions "xen-blockhooks open" mapped? "xen-blockhooks status" shows them)` : 'something, e.g. blkback, still has it open'})`,
        );
      }
      throw e;
    }
    await sleep(Math.min(delay, Math.max(0, deadline - Date.now())));
  }
}
