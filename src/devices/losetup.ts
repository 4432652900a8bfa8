/**
 * losetup(8) (util-linux 2.38): argv builders, the `--list --json` parser, and the verified
 * operations every hook uses, one command each through the Runner.
 *
 * - `losetup --find --show` is not atomic against other allocators (losetup(8) says to use
 *   flock); callers that share loop allocation with the stock scripts hold Xen's `block` lock.
 * - util-linux parses options with getopt_long, so `--` ends them: an image path can never be
 *   read as an option. Paths must be absolute too (a hook's working directory means nothing).
 * - `losetup -d` on a loop that is still open does not fail: the kernel sets autoclear and the
 *   device lingers until its last opener (blkback, a dm table, udev's blkid) closes it.
 * - `--list --json` prints numbers bare; BACK-INO may exceed 2^53 on some filesystems, so the
 *   parser reads it from the text, never through a JavaScript number.
 * - File identity is (st_dev, st_ino): losetup reports a loop's backing file as `back-maj:min`
 *   and `back-ino`, compared with a file's FileId (sysfs.ts).
 */
import { readFileSync } from 'node:fs';
import { CommandError, type Runner } from './runner.js';
import { fileIdKey, fileIdOf, type FileId } from './sysfs.js';

export interface LoopInfo {
  /** `/dev/loopN` */
  name: string;
  major: number;
  minor: number;
  /** The backing file, without the " (deleted)" the kernel appends once it is unlinked. */
  backFile: string;
  /** The kernel marked the backing file as unlinked. */
  backDeleted: boolean;
  /** Decimal `maj:min` of the filesystem holding the backing file (e.g. `254:0`). */
  backDev: string | undefined;
  backIno: string | undefined;
  readOnly: boolean;
  offset: number;
  sizeLimit: number;
}

export const LIST_COLUMNS = 'NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN,MAJ:MIN,RO,OFFSET,SIZELIMIT';

const LOOP_DEV = /^\/dev\/loop\d+$/;

function checkImagePath(file: string): void {
  if (!file.startsWith('/')) throw new Error(`losetup: image path must be absolute: ${JSON.stringify(file)}`);
  if (file.includes('\0') || file.includes('\n'))
    throw new Error(`losetup: image path contains a NUL or newline: ${JSON.stringify(file)}`);
}

function checkLoopDev(dev: string): void {
  if (!LOOP_DEV.test(dev)) throw new Error(`not a loop device: ${JSON.stringify(dev)}`);
}

export interface AttachOptions {
  readOnly: boolean;
  /** Open the backing file with O_DIRECT (`--direct-io=on`; not on tmpfs). */
  direct?: boolean;
}

export function attachArgs(file: string, opts: AttachOptions): string[] {
  checkImagePath(file);
  return [
    '--find',
    '--show',
    ...(opts.readOnly ? ['--read-only'] : []),
    ...(opts.direct ? ['--direct-io=on'] : []),
    '--',
    file,
  ];
}

export function detachArgs(dev: string): string[] {
  checkLoopDev(dev);
  return ['--detach', dev];
}

export function resizeArgs(dev: string): string[] {
  checkLoopDev(dev);
  return ['--set-capacity', dev];
}

export function listArgs(): string[] {
  return ['--list', '--json', '--output', LIST_COLUMNS];
}

function mm(s: unknown): { major: number; minor: number } | undefined {
  if (typeof s !== 'string') return undefined;
  const m = /^\s*(\d+):(\d+)\s*$/.exec(s);
  return m ? { major: Number(m[1]), minor: Number(m[2]) } : undefined;
}

function flag(v: unknown): boolean {
  return v === true || v === 1 || v === '1';
}

/** Parse `losetup --list --json --output LIST_COLUMNS`. */
export function parseLoopList(json: string): LoopInfo[] {
  if (json.trim() === '') return [];
  // Keep BACK-INO exact: quote it before JSON.parse (keys start a line in losetup's output and
  // strings cannot contain a raw newline, so this cannot match inside a file name).
  const text = json.replace(/^(\s*"back-ino":\s*)(\d+)/gm, '$1"$2"');
  const doc = JSON.parse(text) as { loopdevices?: Record<string, unknown>[] };
  if (!doc || !Array.isArray(doc.loopdevices)) throw new Error('losetup --json: no "loopdevices" array');
  const out: LoopInfo[] = [];
  for (const d of doc.loopdevices) {
    const self = mm(d['maj:min']);
    const back = mm(d['back-maj:min']);
    const file = typeof d['back-file'] === 'string' ? (d['back-file'] as string) : undefined;
    if (typeof d.name !== 'string' || !self || file === undefined) continue; // not bound
    out.push({
      name: d.name,
      major: self.major,
      minor: self.minor,
      backFile: file.replace(/ \(deleted\)$/, ''),
      backDeleted: file.endsWith(' (deleted)'),
      backDev: back ? `${back.major}:${back.minor}` : undefined,
      backIno: d['back-ino'] === null || d['back-ino'] === undefined ? undefined : String(d['back-ino']),
      readOnly: flag(d.ro),
      offset: Number(d.offset ?? 0) || 0,
      sizeLimit: Number(d.sizelimit ?? 0) || 0,
    });
  }
  return out;
}

/** The loops backed by the file with identity `id` (hard links count as the same file). */
export function filterBacking(loops: readonly LoopInfo[], id: FileId): LoopInfo[] {
  return loops.filter((l) => l.backDev === id.dev && l.backIno === id.ino);
}

export async function listLoops(run: Runner): Promise<LoopInfo[]> {
  return parseLoopList((await run.run('losetup', listArgs())).stdout);
}

/** Every loop device whose backing file is the file `id`. */
export async function loopsBacking(run: Runner, id: FileId): Promise<LoopInfo[]> {
  return filterBacking(await listLoops(run), id);
}

/** losetup opened another file than the one checked (a directory on its path was swapped); the loop was detached. */
export class LoopRedirected extends Error {}

/**
 * Attach `file` (identity `id`) to a free loop device; the caller holds Xen's `block` lock
 * (losetup --find is not atomic). The new device's numbers come from sysfs, not another listing.
 * losetup opens `file` by name, after the caller checked it: a directory on the path swapped for
 * a symbolic link in between would redirect the loop. The kernel names the file it really opened
 * (its resolved path): unless that is the checked path, or a path of the very file that was
 * checked (a store directory reached through a symbolic link), the loop is detached and
 * LoopRedirected thrown.
 */
export async function attachLoop(run: Runner, file: string, id: FileId, opts: AttachOptions): Promise<LoopInfo> {
  const args = attachArgs(file, opts);
  const r = await run.run('losetup', args);
  const name = r.stdout.trim();
  if (!LOOP_DEV.test(name)) throw new Error(`losetup ${args.join(' ')} printed "${name}", not a loop device`);
  const sys = `${run.sysRoot ?? '/sys'}/block/${name.slice('/dev/'.length)}`;
  const m = /^(\d+):(\d+)$/.exec(readFileSync(`${sys}/dev`, 'utf8').trim());
  if (!m) throw new Error(`${sys}/dev does not hold major:minor`);
  const ro = readFileSync(`${sys}/ro`, 'utf8').trim() === '1';
  if (opts.readOnly && !ro)
    throw new Error(`${name} over ${file} is not read-only although losetup was asked for --read-only`);
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
    throw new LoopRedirected(
      `${file} changed while it was being attached: ${name} opened ${back} instead (a directory on the path was replaced, e.g. by a symbolic link); detached it and refused the disk.`,
    );
  }
  return {
    name,
    major: Number(m[1]),
    minor: Number(m[2]),
    backFile: file,
    backDeleted: false,
    backDev: id.dev,
    backIno: id.ino,
    readOnly: ro,
    offset: 0,
    sizeLimit: 0,
  };
}

/**
 * `losetup --detach DEV`. Resolves true when it detached (or, if the device is still open,
 * marked it autoclear), false when it was not bound (remove is idempotent).
 */
export async function detachLoop(run: Runner, dev: string): Promise<boolean> {
  const r = await run.probe('losetup', detachArgs(dev));
  if (!r.failed) return true;
  if (/No such device or address|No such file or directory/.test(r.stderr)) return false;
  throw new CommandError(r);
}

/** `losetup --set-capacity DEV`: pick up a grown backing file. */
export async function resizeLoop(run: Runner, dev: string): Promise<void> {
  await run.run('losetup', resizeArgs(dev));
}
