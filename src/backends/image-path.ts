/**
 * Where an image may come from. Every image a hook opens (a base, a qcow2 image, each file of a
 * backing chain) must resolve, symlinks followed, to a regular file below one of the configured
 * image directories (config.imageDirs, themselves resolved). Refused, each with a sentence that
 * says what to do: relative paths, `..` components, control characters, a missing file, a symlink
 * leading out of the directories, a directory, a device node (unless the caller allows block
 * devices), a socket or fifo, and what cannot be opened for reading (read-only and non-blocking,
 * so a FIFO swapped in cannot hang the caller) or is not, once open, what was checked.
 *
 * The answer carries the resolved path: callers open that one, not the spelling they were given,
 * so a symlink swapped after the check does not redirect them.
 */
import { closeSync, constants as fsc, fstatSync, openSync, realpathSync, statSync, type BigIntStats } from 'node:fs';
import { isAbsolute, sep } from 'node:path';
import { HotplugError } from '../disk/errors.js';
import { spacedPathHint } from './params-words.js';

export interface CheckedImage {
  /** As given. */
  given: string;
  /** Symlinks resolved. */
  real: string;
  /** The image directory it lies in (resolved). */
  dir: string;
  stat: BigIntStats;
  isBlockDevice: boolean;
}

export interface ImagePathOptions {
  /** Accept a block device (block-cow bases may be one); default false. */
  allowBlockDevice?: boolean;
  /** How the image is called in messages, e.g. `base image`, `backing file of /a.qcow2`. */
  what?: string;
  /** The path was read from a disk's params: a missing one that holds a space says how the params were read. */
  fromParams?: boolean;
}

/** The image directories that exist, resolved; a missing one is skipped. */
export function resolvedImageDirs(imageDirs: readonly string[]): string[] {
  const out: string[] = [];
  for (const d of imageDirs) {
    try {
      out.push(realpathSync(d));
    } catch {
      // not there: nothing can lie below it
    }
  }
  return out;
}

export function isBelow(path: string, dir: string): boolean {
  return dir === '/' || path === dir || path.startsWith(dir.endsWith(sep) ? dir : dir + sep);
}

export function checkImagePath(path: string, imageDirs: readonly string[], opts: ImagePathOptions = {}): CheckedImage {
  const what = opts.what ?? 'image';
  const allowed = `the allowed image directories (image_dirs: ${imageDirs.join(' ') || 'none'})`;
  // eslint-disable-next-line no-control-regex -- control characters are exactly what is refused
  if (path === '' || /[\0-\x1f\x7f]/.test(path))
    throw new HotplugError(`The ${what} path ${JSON.stringify(path)} is empty or contains control characters.`);
  if (!isAbsolute(path))
    throw new HotplugError(
      `The ${what} "${path}" is not an absolute path; give the full path below one of ${allowed}.`,
    );
  if (path.split('/').includes('..'))
    throw new HotplugError(`The ${what} "${path}" contains "..": give a plain path below one of ${allowed}.`);
  let real: string;
  try {
    real = realpathSync(path);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR')
      throw new HotplugError(
        `The ${what} ${path} does not exist (or a symlink on the way leads nowhere).${opts.fromParams ? spacedPathHint(path) : ''}`,
      );
    if (code === 'ENAMETOOLONG')
      throw new HotplugError(
        `The ${what} path is too long for the kernel (${Buffer.byteLength(path)} bytes, ENAMETOOLONG): ${path.slice(0, 80)}…`,
      );
    if (code === 'ELOOP') throw new HotplugError(`The ${what} ${path} cannot be resolved: a loop of symbolic links.`);
    throw new HotplugError(`The ${what} ${path} cannot be resolved: ${(e as Error).message}.`);
  }
  const dir = resolvedImageDirs(imageDirs).find((d) => isBelow(real, d));
  if (dir === undefined) {
    const via = real === path ? '' : ` (it resolves to ${real})`;
    throw new HotplugError(
      `The ${what} ${path}${via} lies outside ${allowed}; move it there or add its directory to image_dirs in /etc/xen/blockhooks.conf.`,
    );
  }
  const st = statSync(real, { bigint: true });
  const isBlockDevice = st.isBlockDevice();
  if (isBlockDevice && !opts.allowBlockDevice)
    throw new HotplugError(`The ${what} ${path} is a block device; only image files are accepted here.`);
  if (!st.isFile() && !isBlockDevice) {
    const kind = st.isDirectory()
      ? 'a directory'
      : st.isFIFO()
        ? 'a FIFO'
        : st.isSocket()
          ? 'a socket'
          : st.isCharacterDevice()
            ? 'a character device'
            : 'not a regular file';
    throw new HotplugError(`The ${what} ${path} is ${kind}; give an image file.`);
  }
  // Opened (read-only, non-blocking, no symlink followed) to prove it is what was stat'ed.
  let fd: number;
  try {
    fd = openSync(real, fsc.O_RDONLY | fsc.O_NOFOLLOW | fsc.O_NONBLOCK);
  } catch (e) {
    throw new HotplugError(`The ${what} ${path} cannot be opened for reading: ${(e as Error).message}.`);
  }
  try {
    const fst = fstatSync(fd, { bigint: true });
    if (fst.dev !== st.dev || fst.ino !== st.ino)
      throw new HotplugError(`The ${what} ${path} changed while it was being checked; try again.`);
  } finally {
    closeSync(fd);
  }
  return { given: path, real, dir, stat: st, isBlockDevice };
}
