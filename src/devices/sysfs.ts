/**
 * Device numbers and the little that sysfs tells about a block device, without spawning anything.
 *
 * Three spellings of one device number are in play, and mixing them up is a classic bug (the
 * stock `block` script compares losetup's decimal `[65024]` with `stat %D`'s hex `fe00`):
 *   - st_dev / st_rdev: the kernel's encoded dev_t (decode with `decodeDev`);
 *   - `physical-device` in xenstore: lowercase hex `maj:min`, no padding (`physicalDevice`);
 *   - device-mapper tables, losetup and /sys/dev/block: decimal `maj:min` (`decimalDevice`).
 * Compare numbers, never strings.
 */
import { existsSync, readFileSync, statSync } from 'node:fs';
import { readdir, readFile, readlink, stat } from 'node:fs/promises';

export interface MajorMinor {
  major: number;
  minor: number;
}

/** glibc's gnu_dev_major/gnu_dev_minor: the Linux dev_t encoding. */
export function decodeDev(dev: number | bigint): MajorMinor {
  const d = BigInt(dev);
  // The masks are 32 bits wide, as in glibc: an unbounded ~0xff would pull the high major
  // bits into the minor.
  const major = ((d >> 8n) & 0xfffn) | ((d >> 32n) & 0xfffff000n);
  const minor = (d & 0xffn) | ((d >> 12n) & 0xffffff00n);
  return { major: Number(major), minor: Number(minor) };
}

/** The inverse of decodeDev (gnu_dev_makedev). */
export function encodeDev({ major, minor }: MajorMinor): bigint {
  const ma = BigInt(major);
  const mi = BigInt(minor);
  return ((ma & 0xfffn) << 8n) | ((ma & 0xfffff000n) << 32n) | (mi & 0xffn) | ((mi & 0xffffff00n) << 12n);
}

/** Major and minor of the device node at `path` (follows symlinks such as /dev/mapper/x). */
export async function majorMinor(path: string): Promise<MajorMinor> {
  const st = await stat(path, { bigint: true });
  if (!st.isBlockDevice() && !st.isCharacterDevice()) throw new Error(`${path} is not a device node`);
  return decodeDev(st.rdev);
}

/** True when `path` exists and is (a symlink to) a block device. */
export async function isBlockDevice(path: string): Promise<boolean> {
  try {
    return (await stat(path)).isBlockDevice();
  } catch {
    return false;
  }
}

/** Identity of a regular file: the device it lives on and its inode (hard links share it). */
export interface FileIdentity {
  dev: MajorMinor;
  ino: bigint;
}

export async function fileIdentity(path: string): Promise<FileIdentity> {
  const st = await stat(path, { bigint: true });
  return { dev: decodeDev(st.dev), ino: st.ino };
}

/** `physical-device` for xenstore: lowercase hex, no padding (`fd:3`, as `stat -c %t:%T`). */
export function physicalDevice({ major, minor }: MajorMinor): string {
  return `${major.toString(16)}:${minor.toString(16)}`;
}

/** Parse a `physical-device` value (hex, as blkback's `%x:%x`). */
export function parsePhysicalDevice(s: string): MajorMinor {
  const m = /^([0-9a-fA-F]{1,8}):([0-9a-fA-F]{1,8})$/.exec(s.trim());
  if (!m) throw new Error(`not a physical-device value: ${JSON.stringify(s)}`);
  return { major: parseInt(m[1]!, 16), minor: parseInt(m[2]!, 16) };
}

/** Decimal `maj:min`, as device-mapper tables and /sys/dev/block name devices. */
export function decimalDevice({ major, minor }: MajorMinor): string {
  return `${major}:${minor}`;
}

/** Parse a decimal `maj:min` (losetup's BACK-MAJ:MIN and MAJ:MIN columns are space padded). */
export function parseDecimalDevice(s: string): MajorMinor {
  const m = /^\s*(\d{1,10}):(\d{1,10})\s*$/.exec(s);
  if (!m) throw new Error(`not a decimal major:minor: ${JSON.stringify(s)}`);
  return { major: Number(m[1]), minor: Number(m[2]) };
}

export function sameDevice(a: MajorMinor, b: MajorMinor): boolean {
  return a.major === b.major && a.minor === b.minor;
}

/** `/sys/dev/block/MAJ:MIN` (root may be changed for tests). */
export function sysBlockDir(mm: MajorMinor, sysRoot = '/sys'): string {
  return `${sysRoot}/dev/block/${decimalDevice(mm)}`;
}

async function readAttr(mm: MajorMinor, attr: string, sysRoot: string): Promise<string | null> {
  try {
    return (await readFile(`${sysBlockDir(mm, sysRoot)}/${attr}`, 'utf8')).replace(/\n$/, '');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') return null;
    throw e;
  }
}

/** Size in 512-byte sectors (`size`), or null when the device does not exist. */
export async function sizeSectors(mm: MajorMinor, sysRoot = '/sys'): Promise<bigint | null> {
  const v = await readAttr(mm, 'size', sysRoot);
  return v === null ? null : BigInt(v.trim());
}

/** The device-mapper name (`dm/name`), or null when it is not a dm device. */
export async function dmName(mm: MajorMinor, sysRoot = '/sys'): Promise<string | null> {
  return readAttr(mm, 'dm/name', sysRoot);
}

/**
 * The loop device's backing file (`loop/backing_file`), or null when it is not a bound loop
 * device. The kernel appends " (deleted)" when the file was unlinked.
 */
export async function loopBackingFile(mm: MajorMinor, sysRoot = '/sys'): Promise<string | null> {
  return readAttr(mm, 'loop/backing_file', sysRoot);
}

/**
 * Whether a loop device is bound and set to detach itself on last close (`loop/autoclear`): what
 * `losetup -d` leaves behind on a loop that something still holds open. null when not bound.
 */
export async function loopAutoclear(mm: MajorMinor, sysRoot = '/sys'): Promise<boolean | null> {
  const v = await readAttr(mm, 'loop/autoclear', sysRoot);
  return v === null ? null : v.trim() === '1';
}

/** Whether the device is read-only (`ro`). */
export async function isReadOnly(mm: MajorMinor, sysRoot = '/sys'): Promise<boolean | null> {
  const v = await readAttr(mm, 'ro', sysRoot);
  return v === null ? null : v.trim() === '1';
}

/** Kernel names of the devices stacked on this one (`holders/`, e.g. `dm-3`): in use by dm. */
export async function holders(mm: MajorMinor, sysRoot = '/sys'): Promise<string[]> {
  try {
    return (await readdir(`${sysBlockDir(mm, sysRoot)}/holders`)).sort();
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw e;
  }
}

/** The kernel name of a device (`loop0`, `dm-3`), from the /sys/dev/block symlink. */
export async function kernelName(mm: MajorMinor, sysRoot = '/sys'): Promise<string | null> {
  try {
    const target = await readlink(sysBlockDir(mm, sysRoot));
    return target.split('/').pop() ?? null;
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------------------------------------
// Synchronous readers for the hooks' hot path, and file identities as losetup prints them

/** A file's identity as losetup reports a loop's backing file: its filesystem's decimal `major:minor`, and its inode. */
export interface FileId {
  /** major:minor of the filesystem holding the file, decimal, e.g. `254:0`. */
  dev: string;
  ino: string;
}

/** dev_t → decimal `major:minor`. */
export function devString(dev: bigint): string {
  return decimalDevice(decodeDev(dev));
}

/** Decimal `major:minor` → dev_t (what Node's stat reports as `dev`): the inverse of devString. */
export function devT(dev: string): bigint {
  return encodeDev(parseDecimalDevice(dev));
}

export function fileIdOf(path: string): FileId {
  const st = statSync(path, { bigint: true });
  return { dev: devString(st.dev), ino: st.ino.toString() };
}

export function fileIdKey(id: FileId): string {
  return `${id.dev}:${id.ino}`;
}

/** Size in 512-byte sectors of block device `major:minor`, read from the sysfs of `on` (a Runner: its sysRoot, default /sys). */
export function deviceSectors(on: { readonly sysRoot?: string }, major: number, minor: number): number {
  const text = readFileSync(`${on.sysRoot ?? '/sys'}/dev/block/${major}:${minor}/size`, 'utf8').trim();
  if (!/^\d+$/.test(text)) throw new Error(`/sys/dev/block/${major}:${minor}/size holds "${text}"`);
  return Number(text);
}

/** The path to hand out for a dm device: /dev/mapper/NAME when udev (or dmsetup) made it, else /dev/dm-MINOR. */
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
