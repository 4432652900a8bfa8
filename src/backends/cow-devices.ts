/**
 * The device operations block-cow and the shared undoers need, each one command through the
 * Runner: loop devices (losetup), device-mapper (dmsetup), and device numbers (stat, sysfs).
 *
 * File identity is (st_dev, st_ino). losetup reports a loop's backing file as `back-maj:min` and
 * `back-ino`, so a file's st_dev is decoded into major:minor (glibc's dev_t layout) to compare.
 */
import { existsSync, readFileSync, statSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { CommandError, type Runner } from '../devices/runner.js';
import { HotplugError } from '../hotplug/errors.js';

/** Where sysfs is mounted; host tests with a recording runner point it at a fake tree. */
export const sysfs = { root: '/sys' };

export interface FileId {
  /** major:minor of the filesystem holding the file, decimal, e.g. `254:0`. */
  dev: string;
  ino: string;
}

/** glibc's dev_t encoding → `major:minor` (decimal). */
export function devString(dev: bigint): string {
  const major = ((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn);
  const minor = (dev & 0xffn) | ((dev >> 12n) & ~0xffn);
  return `${major}:${minor}`;
}

/** `major:minor` → glibc's dev_t (what Node's stat reports as `dev`): the inverse of devString. */
export function devT(dev: string): bigint {
  const [maj = 0n, min = 0n] = dev.split(':').map((s) => BigInt(s));
  return (min & 0xffn) | ((maj & 0xfffn) << 8n) | ((min & ~0xffn) << 12n) | ((maj & ~0xfffn) << 32n);
}

export function fileIdOf(path: string): FileId {
  const st = statSync(path, { bigint: true });
  return { dev: devString(st.dev), ino: st.ino.toString() };
}

export function fileIdKey(id: FileId): string {
  return `${id.dev}:${id.ino}`;
}

export interface LoopInfo {
  /** `/dev/loopN` */
  name: string;
  major: number;
  minor: number;
  backFile: string | undefined;
  backDev: string | undefined;
  backIno: string | undefined;
  readOnly: boolean;
  offset: number;
  sizeLimit: number;
}

function mm(s: unknown): { major: number; minor: number } | undefined {
  if (typeof s !== 'string') return undefined;
  const m = /^\s*(\d+):(\d+)\s*$/.exec(s);
  return m ? { major: Number(m[1]), minor: Number(m[2]) } : undefined;
}

/** `losetup --list --json` of util-linux 2.3x. */
export function parseLoopList(text: string): LoopInfo[] {
  if (text.trim() === '') return [];
  const doc = JSON.parse(text) as { loopdevices?: Record<string, unknown>[] };
  const out: LoopInfo[] = [];
  for (const d of doc.loopdevices ?? []) {
    const self = mm(d['maj:min']);
    const back = mm(d['back-maj:min']);
    if (typeof d.name !== 'string' || !self) continue;
    out.push({
      name: d.name,
      major: self.major,
      minor: self.minor,
      backFile: typeof d['back-file'] === 'string' ? (d['back-file'] as string).replace(/ \(deleted\)$/, '') : undefined,
      backDev: back ? `${back.major}:${back.minor}` : undefined,
      backIno: d['back-ino'] === null || d['back-ino'] === undefined ? undefined : String(d['back-ino']),
      readOnly: d.ro === true || d.ro === 1 || d.ro === '1',
      offset: Number(d.offset ?? 0) || 0,
      sizeLimit: Number(d.sizelimit ?? 0) || 0,
    });
  }
  return out;
}

export async function listLoops(run: Runner): Promise<LoopInfo[]> {
  const r = await run.run('losetup', ['--list', '--json', '--output', 'NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN,MAJ:MIN,RO,OFFSET,SIZELIMIT']);
  return parseLoopList(r.stdout);
}

/** Every loop device whose backing file is the file `id`. */
export async function loopsBacking(run: Runner, id: FileId): Promise<LoopInfo[]> {
  return (await listLoops(run)).filter((l) => l.backDev === id.dev && l.backIno === id.ino);
}

/**
 * Attach `file` (identity `id`) to a free loop device; the caller holds Xen's `block` lock
 * (losetup --find is not atomic). The new device's numbers come from sysfs, not another listing.
 */
export async function attachLoop(run: Runner, file: string, id: FileId, opts: { readOnly: boolean }): Promise<LoopInfo> {
  const args = ['--find', '--show', ...(opts.readOnly ? ['--read-only'] : []), '--', file];
  const r = await run.run('losetup', args);
  const name = r.stdout.trim();
  if (!/^\/dev\/loop\d+$/.test(name)) throw new Error(`losetup ${args.join(' ')} printed "${name}", not a loop device`);
  const sys = `${sysfs.root}/block/${name.slice('/dev/'.length)}`;
  const m = /^(\d+):(\d+)$/.exec(readFileSync(`${sys}/dev`, 'utf8').trim());
  if (!m) throw new Error(`${sys}/dev does not hold major:minor`);
  const ro = readFileSync(`${sys}/ro`, 'utf8').trim() === '1';
  if (opts.readOnly && !ro) throw new Error(`${name} over ${file} is not read-only although losetup was asked for --read-only`);
  // losetup opens `file` by name, after the caller checked it: a directory on the path swapped for
  // a symbolic link in between would redirect the loop. The kernel names the file it really
  // opened (its resolved path): unless that is the checked path, or a path of the very file that
  // was checked (a store directory reached through a symbolic link), the loop is detached and the
  // disk refused.
  let back: string | undefined;
  try {
    back = readFileSync(`${sys}/loop/backing_file`, 'utf8').trim();
  } catch {
    back = undefined;
  }
  let same = back === undefined || back === file;
  if (!same && back !== undefined) {
    try {
      same = fileIdKey(fileIdOf(back)) === fileIdKey(id);
    } catch {
      same = false;
    }
  }
  if (!same && back !== undefined) {
    await detachLoop(run, name);
    throw new HotplugError(`${file} changed while it was being attached: ${name} opened ${back} instead (a directory on the path was replaced, e.g. by a symbolic link); detached it and refused the disk.`);
  }
  return { name, major: Number(m[1]), minor: Number(m[2]), backFile: file, backDev: id.dev, backIno: id.ino, readOnly: ro, offset: 0, sizeLimit: 0 };
}

/** Detach `/dev/loopN`; a device that is not attached any more is fine. */
export async function detachLoop(run: Runner, name: string): Promise<void> {
  const r = await run.probe('losetup', ['--detach', name]);
  if (!r.failed) return;
  if (/No such device or address|No such file or directory/.test(r.stderr)) return;
  throw new CommandError(r);
}

export interface DmInfo {
  name: string;
  major: number;
  minor: number;
  open: number;
  uuid: string;
}

/** `dmsetup info` of one device, or undefined when there is no such device. */
export async function dmInfo(run: Runner, name: string): Promise<DmInfo | undefined> {
  const r = await run.probe('dmsetup', ['info', '-c', '--noheadings', '--separator', '|', '-o', 'name,major,minor,open,uuid', '--', name]);
  if (r.failed) {
    if (/does not exist|No such device/i.test(r.stderr)) return undefined;
    throw new CommandError(r);
  }
  const f = r.stdout.trim().split('|');
  if (f.length < 5 || !/^\d+$/.test(f[1] ?? '') || !/^\d+$/.test(f[2] ?? '')) throw new Error(`dmsetup info ${name}: cannot read "${r.stdout.trim()}"`);
  return { name: f[0] as string, major: Number(f[1]), minor: Number(f[2]), open: Number(f[3]) || 0, uuid: f.slice(4).join('|') };
}

export async function dmCreate(run: Runner, name: string, table: string, opts: { readOnly?: boolean; uuid?: string } = {}): Promise<DmInfo> {
  const args = ['create', ...(opts.readOnly ? ['--readonly'] : []), ...(opts.uuid ? ['--uuid', opts.uuid] : []), '--table', table, '--', name];
  await run.run('dmsetup', args);
  const info = await dmInfo(run, name);
  if (!info) throw new Error(`dm device ${name} is missing right after dmsetup create`);
  return info;
}

/**
 * Remove dm device `name`, retrying while it is busy (blkback lets go of a device
 * asynchronously) for up to `busyRetryMs`. A device that is already gone is fine.
 */
export async function dmRemove(run: Runner, name: string, busyRetryMs: number): Promise<void> {
  const deadline = Date.now() + busyRetryMs;
  for (let delay = 50; ; delay = Math.min(delay * 2, 500)) {
    const r = await run.probe('dmsetup', ['remove', '--', name]);
    if (!r.failed) return;
    if (/No such device or address|does not exist/i.test(r.stderr)) {
      if (!(await dmInfo(run, name))) return;
    }
    if (!/busy/i.test(r.stderr) || Date.now() >= deadline) {
      const e = new CommandError(r);
      if (/busy/i.test(r.stderr)) throw new Error(`${e.message} (still busy after ${busyRetryMs} ms: something, e.g. blkback, still has it open)`);
      throw e;
    }
    await sleep(Math.min(delay, Math.max(0, deadline - Date.now())));
  }
}

/** Size in 512-byte sectors of block device `major:minor`, from sysfs. */
export function deviceSectors(major: number, minor: number): number {
  const text = readFileSync(`${sysfs.root}/dev/block/${major}:${minor}/size`, 'utf8').trim();
  if (!/^\d+$/.test(text)) throw new Error(`/sys/dev/block/${major}:${minor}/size holds "${text}"`);
  return Number(text);
}

/** The path to hand out for a dm device: /dev/mapper/NAME when udev made it, else /dev/dm-MINOR. */
export function dmDevicePath(name: string, minor: number, major: number): string {
  const mapper = `/dev/mapper/${name}`;
  try {
    const st = statSync(mapper, { bigint: true });
    if (st.isBlockDevice() && devString(st.rdev) === `${major}:${minor}`) return mapper;
  } catch {
    // no node: no udev
  }
  const dm = `/dev/dm-${minor}`;
  return existsSync(dm) ? dm : mapper;
}
