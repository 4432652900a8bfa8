/**
 * losetup(8) (util-linux 2.38): argv builders, an output parser, and thin helpers over a Runner.
 *
 * - `losetup --find --show` is not atomic against other allocators (losetup(8) says to use
 *   flock); callers that share loop allocation with the stock scripts hold Xen's `block` lock.
 * - util-linux parses options with getopt_long, so `--` ends them: an image path can never be
 *   read as an option. Paths must be absolute too (a hook's working directory means nothing).
 * - `losetup -d` on a loop that is still open does not fail: the kernel sets autoclear and the
 *   device lingers until its last opener (blkback, a dm table, udev's blkid) closes it.
 * - `--list --json` prints numbers bare; BACK-INO may exceed 2^53 on some filesystems, so the
 *   parser reads it as a BigInt from the text.
 */
import { CommandError, type Runner } from './runner.js';
import { decodeDev, parseDecimalDevice, type MajorMinor } from './sysfs.js';

export interface LoopDevice {
  /** `/dev/loopN` */
  device: string;
  /** Decimal major:minor of the loop device itself. */
  devNo: MajorMinor;
  /** As the kernel reports it; ends in " (deleted)" when the file was unlinked. */
  backingFile: string;
  /** The kernel marked the backing file as unlinked. */
  backingDeleted: boolean;
  /** Decimal `maj:min` of the filesystem holding the backing file (e.g. `254:0`). */
  backingDev: string;
  backingIno: bigint;
  readOnly: boolean;
  autoclear: boolean;
  offset: number;
  sizeLimit: number;
  directIo: boolean;
}

export const LIST_COLUMNS = 'NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN,MAJ:MIN,RO,SIZELIMIT,OFFSET,AUTOCLEAR,DIO';

const LOOP_DEV = /^\/dev\/loop\d+$/;

function checkImagePath(file: string): void {
  if (!file.startsWith('/')) throw new Error(`losetup: image path must be absolute: ${JSON.stringify(file)}`);
  if (file.includes('\0') || file.includes('\n')) throw new Error(`losetup: image path contains a NUL or newline: ${JSON.stringify(file)}`);
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
  return ['--find', '--show', ...(opts.readOnly ? ['--read-only'] : []), ...(opts.direct ? ['--direct-io=on'] : []), '--', file];
}

export function detachArgs(dev: string): string[] {
  checkLoopDev(dev);
  return ['--detach', dev];
}

export function resizeArgs(dev: string): string[] {
  checkLoopDev(dev);
  return ['--set-capacity', dev];
}

export function listArgs(devices: readonly string[] = []): string[] {
  devices.forEach(checkLoopDev);
  return ['--list', '--json', '--output', LIST_COLUMNS, ...(devices.length ? ['--', ...devices] : [])];
}

/** Parse `losetup --list --json --output LIST_COLUMNS`; unbound devices are left out. */
export function parseLoopList(json: string): LoopDevice[] {
  if (json.trim() === '') return [];
  // Keep BACK-INO exact: quote it before JSON.parse (keys start a line in losetup's output and
  // strings cannot contain a raw newline, so this cannot match inside a file name).
  const text = json.replace(/^(\s*"back-ino":\s*)(\d+)/gm, '$1"$2"');
  const doc = JSON.parse(text) as { loopdevices?: Record<string, unknown>[] };
  if (!doc || !Array.isArray(doc.loopdevices)) throw new Error('losetup --json: no "loopdevices" array');
  const out: LoopDevice[] = [];
  for (const d of doc.loopdevices) {
    if (typeof d['back-file'] !== 'string') continue; // not bound
    const name = String(d.name);
    const file = d['back-file'];
    out.push({
      device: name,
      devNo: parseDecimalDevice(String(d['maj:min'])),
      backingFile: file,
      backingDeleted: file.endsWith(' (deleted)'),
      backingDev: decimal(parseDecimalDevice(String(d['back-maj:min']))),
      backingIno: BigInt(String(d['back-ino'])),
      readOnly: flag(d.ro),
      autoclear: flag(d.autoclear),
      offset: Number(d.offset ?? 0),
      sizeLimit: Number(d.sizelimit ?? 0),
      directIo: flag(d.dio),
    });
  }
  return out;
}

function flag(v: unknown): boolean {
  return v === true || v === 1 || v === '1';
}

function decimal(mm: MajorMinor): string {
  return `${mm.major}:${mm.minor}`;
}

/** The loop devices backed by the file with this identity (device numbers compared as numbers). */
export function filterBacking(loops: readonly LoopDevice[], id: { dev: MajorMinor | number | bigint; ino: number | bigint }): LoopDevice[] {
  const dev = typeof id.dev === 'object' ? id.dev : decodeDev(id.dev);
  const ino = BigInt(id.ino);
  return loops.filter((l) => {
    const b = parseDecimalDevice(l.backingDev);
    return b.major === dev.major && b.minor === dev.minor && l.backingIno === ino;
  });
}

/** `losetup --find --show [--read-only] [--direct-io=on] -- FILE` → `/dev/loopN`. */
export async function attachLoop(run: Runner, file: string, opts: AttachOptions): Promise<string> {
  const r = await run.run('losetup', attachArgs(file, opts));
  const dev = r.stdout.trim();
  if (!LOOP_DEV.test(dev)) throw new Error(`losetup printed no loop device for ${file}: ${JSON.stringify(r.stdout)}`);
  return dev;
}

/**
 * `losetup --detach DEV`. Resolves true when it detached (or, if the device is still open,
 * marked it autoclear), false when it was not bound (remove is idempotent).
 */
export async function detachLoop(run: Runner, dev: string): Promise<boolean> {
  const r = await run.probe('losetup', detachArgs(dev));
  if (!r.failed) return true;
  if (/No such device or address/.test(r.stderr)) return false;
  throw new CommandError(r);
}

/** `losetup --set-capacity DEV`: pick up a grown backing file. */
export async function resizeLoop(run: Runner, dev: string): Promise<void> {
  await run.run('losetup', resizeArgs(dev));
}

/** Bound loop devices (all, or the ones named). */
export async function listLoops(run: Runner, devices: readonly string[] = []): Promise<LoopDevice[]> {
  const r = await run.run('losetup', listArgs(devices));
  return parseLoopList(r.stdout);
}

/** Loop devices on the file with this identity (st_dev, st_ino); hard links count as the same file. */
export async function loopsBacking(run: Runner, id: { dev: MajorMinor | number | bigint; ino: number | bigint }): Promise<LoopDevice[]> {
  return filterBacking(await listLoops(run), id);
}
