/**
 * qemu-img and qemu-nbd: argument vectors and output parsers, nothing that runs. Callers pass the
 * vectors to the Runner (`qemu-img`, `qemu-nbd`); every user path comes after `--`.
 *
 * The format of an image is always given explicitly (`-f`, `--format`, `-F`) once it is known:
 * qemu probes an image without one, and a probed image a guest could write to can claim to be any
 * format with any backing file (the classic qcow2-header-in-a-raw-disk attack). The one probe
 * allowed is `qemu-img info` without `-f`, done once per add, on an image that is then checked.
 *
 * `qemu-img info` always gets `-U` (--force-share): the image may be open in a running qemu-nbd
 * (a base shared by other domains), and without -U qemu-img refuses with "Failed to get shared
 * 'write' lock". Only metadata is read.
 */
import type { RunResult, Runner } from './runner.js';

/** Formats an image may have. Anything else (vvfat, dmg, luks, a protocol…) is refused. */
export const KNOWN_FORMATS = ['raw', 'qcow2', 'qcow', 'qed', 'vmdk', 'vdi', 'vhdx', 'vpc'] as const;
export type ImageFormat = (typeof KNOWN_FORMATS)[number];

export function isKnownFormat(f: string): f is ImageFormat {
  return (KNOWN_FORMATS as readonly string[]).includes(f);
}

/** qemu's -o cache modes (qemu-nbd --cache). */
export const CACHE_MODES = ['none', 'writeback', 'writethrough', 'directsync', 'unsafe'] as const;

export interface ImageInfo {
  /** The file qemu opened, as it names it. */
  filename: string;
  format: string;
  virtualSize: number;
  /** The backing file as written in the image header (may be relative). */
  backingFilename: string | undefined;
  /** The backing file resolved by qemu (relative names are against the image's directory). */
  fullBackingFilename: string | undefined;
  /** The backing file's format as recorded in the image; absent means qemu would probe it. */
  backingFormat: string | undefined;
  encrypted: boolean;
  /** A qcow2 external data file (format-specific data-file), when the image has one. */
  dataFile: string | undefined;
  dirty: boolean;
}

export interface InfoOptions {
  /** Explicit format; without it qemu-img probes (only for the one detection per add). */
  format?: string;
  /** Also describe every backing file (`--backing-chain`; the answer is then an array). */
  backingChain?: boolean;
}

/** `qemu-img info --output=json -U [--backing-chain] [-f FMT] -- IMAGE` */
export function qemuImgInfoArgs(image: string, opts: InfoOptions = {}): string[] {
  return [
    'info',
    '--output=json',
    '-U',
    ...(opts.backingChain ? ['--backing-chain'] : []),
    ...(opts.format ? ['-f', opts.format] : []),
    '--',
    image,
  ];
}

/** `qemu-img create -q -f qcow2 -b BASE -F FMT -- OVERLAY` (size taken from the base). */
export function qemuImgCreateOverlayArgs(overlay: string, base: string, baseFormat: string): string[] {
  if (!base.startsWith('/')) throw new Error(`backing file ${base} must be an absolute path`);
  return ['create', '-q', '-f', 'qcow2', '-b', base, '-F', baseFormat, '--', overlay];
}

/** `qemu-img resize -q -f qcow2 -- IMAGE BYTES`: a larger virtual size (never --shrink). */
export function qemuImgResizeArgs(image: string, bytes: number): string[] {
  if (!image.startsWith('/')) throw new Error(`image ${image} must be an absolute path`);
  if (!Number.isSafeInteger(bytes) || bytes < 1)
    throw new Error(`qemu-img resize: the size must be a whole number of bytes, got ${bytes}`);
  return ['resize', '-q', '-f', 'qcow2', '--', image, String(bytes)];
}

export interface NbdConnectOptions {
  device: string;
  image: string;
  format: string;
  readOnly: boolean;
  /** qemu-nbd writes its pid here (before it connects). */
  pidFile: string;
  cache: string;
  /** Pass guest discards down to the image (writable exports only). */
  discard?: boolean;
}

/**
 * `qemu-nbd --connect=DEV --format=FMT --pid-file=F --cache=C [--read-only|--discard=unmap] -- IMAGE`
 *
 * No `--fork`: with --connect and without --verbose qemu-nbd already forks a daemon (new session,
 * stdio on /dev/null) and its parent exits once the device is connected, passing on the child's
 * error messages. With --fork the daemon would keep the parent's stderr open after connecting,
 * and a caller reading that pipe would wait for it to end.
 */
export function qemuNbdConnectArgs(o: NbdConnectOptions): string[] {
  if (!isKnownFormat(o.format)) throw new Error(`unknown image format ${o.format}`);
  return [
    `--connect=${o.device}`,
    `--format=${o.format}`,
    `--pid-file=${o.pidFile}`,
    `--cache=${o.cache}`,
    ...(o.readOnly ? ['--read-only'] : o.discard ? ['--discard=unmap'] : []),
    '--',
    o.image,
  ];
}

/** `qemu-nbd --disconnect DEV` (the daemon serving it then exits). */
export function qemuNbdDisconnectArgs(device: string): string[] {
  return ['--disconnect', device];
}

function str(v: unknown): string | undefined {
  return typeof v === 'string' ? v : undefined;
}

function one(o: unknown, where: string): ImageInfo {
  if (typeof o !== 'object' || o === null || Array.isArray(o))
    throw new Error(`qemu-img info: ${where} is not an object`);
  const r = o as Record<string, unknown>;
  const filename = str(r['filename']);
  const format = str(r['format']);
  if (filename === undefined || format === undefined)
    throw new Error(`qemu-img info: ${where} has no filename or format`);
  const size = r['virtual-size'];
  const fs = r['format-specific'] as { data?: Record<string, unknown> } | undefined;
  return {
    filename,
    format,
    virtualSize: typeof size === 'number' ? size : 0,
    backingFilename: str(r['backing-filename']),
    fullBackingFilename: str(r['full-backing-filename']),
    backingFormat: str(r['backing-filename-format']),
    encrypted: r['encrypted'] === true,
    dataFile: str(fs?.data?.['data-file']),
    dirty: r['dirty-flag'] === true,
  };
}

/**
 * The JSON of `qemu-img info --output=json`: one object, or with --backing-chain an array from
 * the image itself down to the last backing file. Always returns the chain (length 1 without).
 */
export function parseQemuImgInfo(json: string): ImageInfo[] {
  let v: unknown;
  try {
    v = JSON.parse(json);
  } catch (e) {
    throw new Error(`qemu-img info printed something that is not JSON: ${(e as Error).message}`);
  }
  if (Array.isArray(v)) {
    if (v.length === 0) throw new Error('qemu-img info printed an empty backing chain');
    return v.map((o, i) => one(o, `chain element ${i}`));
  }
  return [one(v, 'the answer')];
}

/** qemu refused because another process holds the image's lock (qemu's own sharing check). */
export function isQemuLockConflict(stderr: string): boolean {
  return /Failed to get (shared )?"?'?\w+"?'? lock|Is another process using the image/.test(stderr);
}

// ---------------------------------------------------------------------------------------------
// Over a Runner: each returns the command's result (errors as values), for the caller to explain.

export function qemuImgInfo(run: Runner, image: string, opts: InfoOptions = {}): Promise<RunResult> {
  return run.probe('qemu-img', qemuImgInfoArgs(image, opts));
}

export function qemuImgCreateOverlay(
  run: Runner,
  overlay: string,
  base: string,
  baseFormat: string,
): Promise<RunResult> {
  return run.probe('qemu-img', qemuImgCreateOverlayArgs(overlay, base, baseFormat));
}

export function qemuImgResize(run: Runner, image: string, bytes: number): Promise<RunResult> {
  return run.probe('qemu-img', qemuImgResizeArgs(image, bytes));
}

export function qemuNbdConnect(run: Runner, o: NbdConnectOptions, timeoutMs: number): Promise<RunResult> {
  return run.probe('qemu-nbd', qemuNbdConnectArgs(o), { timeoutMs });
}
