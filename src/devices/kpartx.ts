/**
 * kpartx(8) (multipath-tools 0.9.4): argv builders, parsers of its verbose output, and the two
 * operations `xen-blockhooks open` and `close` use, one command each through the Runner.
 *
 * - kpartx reads DOS (MBR, with extended and logical partitions), GPT (a protective MBR makes it
 *   prefer the GPT), and a few rarer tables; it makes one dm `linear` map per partition over the
 *   whole-disk device it is given. An extended partition's container gets a map too (2 sectors,
 *   as the kernel's own partition scan shows it).
 * - The maps are named after the device: its dm name for a device-mapper device
 *   (`xbh-cow-web-xvda-51712p1`), its kernel name otherwise (`loop0p1`, `nbd0p1`), and the
 *   partition number; `-p p` fixes the delimiter so the names do not depend on whether a
 *   device's name ends in a digit. Their dm uuid is `partN-` and the parent's uuid.
 * - `-r` makes every map read-only in the kernel (dm's read-only flag), `-s` waits for udev.
 * - kpartx parses options with getopt, so `--` ends them: a device path is never an option.
 * - kpartx prints its own failures on stdout, not stderr (`failed to stat() /x`), and exits 0
 *   when the device holds no table it can read (nothing is printed and nothing made).
 * - `-a` on a device whose maps exist already reloads them and prints them again; `-d` of maps
 *   that are gone prints nothing and succeeds.
 */
import { CommandError, type Runner } from './runner.js';

/** The delimiter between a device's name and a partition number (`loop0` + `p` + `1`). */
export const PART_DELIMITER = 'p';

/** One partition map kpartx made. */
export interface PartitionMap {
  /** The dm name, e.g. `loop0p1`. */
  name: string;
  major: number;
  minor: number;
  /** The partition number (from the name). */
  number: number;
  /** Length in 512-byte sectors. */
  sectors: number;
  /** The whole-disk device it maps, decimal `major:minor`. */
  parent: string;
  /** Its first sector on the parent. */
  offset: number;
}

function checkDevice(dev: string): string {
  if (!/^\/dev\/[^\s\0]+$/.test(dev)) throw new Error(`kpartx: not a device path: ${JSON.stringify(dev)}`);
  return dev;
}

/** `kpartx -a -v [-r] -s -p p -- DEV`: map every partition of DEV (read-only unless told). */
export function addArgs(dev: string, opts: { readOnly: boolean }): string[] {
  return ['-a', '-v', ...(opts.readOnly ? ['-r'] : []), '-s', '-p', PART_DELIMITER, '--', checkDevice(dev)];
}

/** `kpartx -d -v -p p -- DEV`: remove the maps of DEV's partitions. */
export function deleteArgs(dev: string): string[] {
  return ['-d', '-v', '-p', PART_DELIMITER, '--', checkDevice(dev)];
}

/** `kpartx -l -p p -- DEV`: list what -a would map, changing nothing (DEV must be a block device: on a file kpartx attaches a loop). */
export function listArgs(dev: string): string[] {
  return ['-l', '-p', PART_DELIMITER, '--', checkDevice(dev)];
}

const ADD_LINE = /^add map (\S+) \((\d+):(\d+)\): 0 (\d+) linear (\d+:\d+) (\d+)$/;
const DEL_LINE = /^del devmap : (\S+)$/;

function partNumber(name: string): number {
  const m = new RegExp(PART_DELIMITER + '(\\d+)$').exec(name);
  if (!m) throw new Error(`kpartx made a map named ${JSON.stringify(name)}, which ends in no partition number`);
  return Number(m[1]);
}

/**
 * `kpartx -a -v` output: one `add map NAME (MAJ:MIN): 0 LEN linear PARENT OFFSET` line per map.
 * Any other line is kpartx saying something went wrong (it prints failures on stdout): thrown.
 */
export function parseAddOutput(text: string): PartitionMap[] {
  const out: PartitionMap[] = [];
  for (const raw of text.split('\n')) {
    const l = raw.trim();
    if (l === '') continue;
    const m = ADD_LINE.exec(l);
    if (!m) throw new Error(`kpartx: ${l}`);
    const name = m[1] as string;
    out.push({
      name,
      major: Number(m[2]),
      minor: Number(m[3]),
      number: partNumber(name),
      sectors: Number(m[4]),
      parent: m[5] as string,
      offset: Number(m[6]),
    });
  }
  return out;
}

/** `kpartx -d -v` output: the names of the maps removed. */
export function parseDeleteOutput(text: string): string[] {
  const out: string[] = [];
  for (const raw of text.split('\n')) {
    const l = raw.trim();
    if (l === '') continue;
    const m = DEL_LINE.exec(l);
    if (!m) throw new Error(`kpartx: ${l}`);
    out.push(m[1] as string);
  }
  return out;
}

/**
 * The maps of a `dmsetup table` listing that are partitions of `parent` (decimal `major:minor`):
 * one linear line over the parent, named `prefix` + `p` + a number. How an undo finds maps that
 * kpartx made before their names were written down.
 */
export function partitionMapsIn(tables: string, parent: string, prefix: string): string[] {
  const out: string[] = [];
  const named = new RegExp('^' + prefix.replace(/[.*+?^${}()|[\]\\]/g, '\\$&') + PART_DELIMITER + '\\d+$');
  for (const raw of tables.split('\n')) {
    const m = /^(\S+): 0 \d+ linear (\d+:\d+) \d+$/.exec(raw.trim());
    if (m && m[2] === parent && named.test(m[1] as string)) out.push(m[1] as string);
  }
  return out;
}

/** Map DEV's partitions; an empty list when it holds no table kpartx can read (then nothing was made). */
export async function kpartxAdd(run: Runner, dev: string, opts: { readOnly: boolean }): Promise<PartitionMap[]> {
  const r = await run.probe('kpartx', addArgs(dev, opts));
  if (r.failed && r.exitCode === undefined && !r.timedOut && !r.signal)
    throw new Error('kpartx could not be started: is it installed (Debian package kpartx)?');
  if (r.failed) {
    // Its reason is on stdout.
    throw new CommandError({ ...r, stderr: `${r.stderr}\n${r.stdout}` });
  }
  return parseAddOutput(r.stdout);
}

/** Remove DEV's partition maps; the names removed. */
export async function kpartxDelete(run: Runner, dev: string): Promise<string[]> {
  const r = await run.probe('kpartx', deleteArgs(dev));
  if (r.failed) throw new CommandError({ ...r, stderr: `${r.stderr}\n${r.stdout}` });
  return parseDeleteOutput(r.stdout);
}
