/**
 * The `rbd` command (Ceph 16, Debian 12's ceph-common): argument builders and parsers for its
 * JSON output. Nothing here runs anything; backends/rbd.ts runs these through the Runner.
 *
 * Every command names the cluster the same way (`--conf`, `--id`, `--keyring`) and bounds the
 * monitor connection (`--client_mount_timeout`), so that an unreachable cluster fails with a
 * message inside libxl's 40 s instead of retrying for minutes.
 *
 * `rbd` exits with the errno of the failure (2 ENOENT, 16 EBUSY, 17 EEXIST); its stderr says
 * which object was missing: `rbd: error opening pool 'x'`, `rbd: error opening image x`,
 * `error setting snapshot context`.
 */
import type { RunResult, Runner } from './runner.js';

/** Pool, image and snapshot names accepted by the hooks: a strict subset of what Ceph allows. */
export const RBD_NAME = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,99}$/;

export interface Cluster {
  /** ceph.conf to use (absolute), else rbd's default (/etc/ceph/ceph.conf, $CEPH_CONF). */
  conf?: string | undefined;
  /** Client id (`--id admin` is client.admin). */
  id?: string | undefined;
  /** Keyring file (absolute). */
  keyring?: string | undefined;
}

export interface ImageSpec {
  pool: string;
  image: string;
  snap?: string | undefined;
}

/** `pool/image` or `pool/image@snap`. */
export function specString(s: ImageSpec): string {
  return `${s.pool}/${s.image}${s.snap === undefined ? '' : `@${s.snap}`}`;
}

/** Seconds rbd waits for the monitors before giving up. */
export const MOUNT_TIMEOUT_S = 15;

export function clusterArgs(c: Cluster): string[] {
  const out: string[] = [];
  if (c.conf !== undefined) out.push('--conf', c.conf);
  if (c.id !== undefined) out.push('--id', c.id);
  if (c.keyring !== undefined) out.push('--keyring', c.keyring);
  out.push('--client_mount_timeout', String(MOUNT_TIMEOUT_S));
  return out;
}

export function infoArgs(c: Cluster, s: ImageSpec): string[] {
  return ['info', '--format', 'json', ...clusterArgs(c), specString(s)];
}

export function snapLsArgs(c: Cluster, s: Omit<ImageSpec, 'snap'>): string[] {
  return ['snap', 'ls', '--format', 'json', ...clusterArgs(c), specString({ pool: s.pool, image: s.image })];
}

export function snapProtectArgs(c: Cluster, s: ImageSpec & { snap: string }): string[] {
  return ['snap', 'protect', ...clusterArgs(c), specString(s)];
}

/** A layered clone with the one feature krbd on every kernel maps (`layering`). */
export function cloneArgs(c: Cluster, parent: ImageSpec & { snap: string }, child: Omit<ImageSpec, 'snap'>): string[] {
  return [
    'clone',
    '--image-feature',
    'layering',
    ...clusterArgs(c),
    specString(parent),
    specString({ pool: child.pool, image: child.image }),
  ];
}

export function rmArgs(c: Cluster, s: Omit<ImageSpec, 'snap'>): string[] {
  return ['rm', '--no-progress', ...clusterArgs(c), specString({ pool: s.pool, image: s.image })];
}

/** `rbd resize --size <n>M`: a clone's size, in whole MiB (never smaller: no --allow-shrink). */
export function resizeArgs(c: Cluster, s: Omit<ImageSpec, 'snap'>, mib: number): string[] {
  if (!Number.isSafeInteger(mib) || mib < 1)
    throw new Error(`rbd resize: the size must be a whole number of MiB, got ${mib}`);
  return [
    'resize',
    '--no-progress',
    '--size',
    `${mib}M`,
    ...clusterArgs(c),
    specString({ pool: s.pool, image: s.image }),
  ];
}

export function statusArgs(c: Cluster, s: Omit<ImageSpec, 'snap'>): string[] {
  return ['status', '--format', 'json', ...clusterArgs(c), specString({ pool: s.pool, image: s.image })];
}

export function showMappedArgs(c: Cluster): string[] {
  return ['showmapped', '--format', 'json', ...clusterArgs(c)];
}

/**
 * `rbd map`: `options` are krbd map options (`-o a,b=c`), `noudev` added when no udevd runs
 * (without it rbd waits for a udev event that never comes).
 */
export function mapArgs(
  c: Cluster,
  s: ImageSpec,
  opts: { readOnly: boolean; noudev: boolean; options?: readonly string[] },
): string[] {
  const o = [...(opts.options ?? []), ...(opts.noudev ? ['noudev'] : [])];
  return [
    'map',
    ...(opts.readOnly ? ['--read-only'] : []),
    ...(o.length ? ['-o', o.join(',')] : []),
    ...clusterArgs(c),
    specString(s),
  ];
}

export function unmapArgs(c: Cluster, device: string, opts: { noudev: boolean; force?: boolean }): string[] {
  const o = [...(opts.noudev ? ['noudev'] : []), ...(opts.force ? ['force'] : [])];
  return ['unmap', ...(o.length ? ['-o', o.join(',')] : []), ...clusterArgs(c), device];
}

// ---------------------------------------------------------------------------------------------
// parsers

function parseJson(text: string, what: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    throw new Error(`${what}: not JSON: ${text.trim().slice(0, 120) || '(empty)'}`);
  }
}

function obj(v: unknown, what: string): Record<string, unknown> {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error(`${what}: expected an object`);
  return v as Record<string, unknown>;
}

function str(v: unknown, what: string): string {
  if (typeof v !== 'string') throw new Error(`${what}: expected a string, found ${JSON.stringify(v)}`);
  return v;
}

function num(v: unknown, what: string): number {
  if (typeof v !== 'number' || !Number.isFinite(v))
    throw new Error(`${what}: expected a number, found ${JSON.stringify(v)}`);
  return v;
}

export interface ImageInfo {
  name: string;
  id: string;
  size: number;
  features: string[];
  /** Present when the image is a clone. */
  parent: { pool: string; namespace: string; image: string; snapshot: string; overlap: number } | undefined;
  /** Only in `rbd info pool/image@snap`: whether that snapshot is protected. */
  protected: boolean | undefined;
}

/** `rbd info --format json` (of an image or of `image@snap`). */
export function parseInfo(text: string): ImageInfo {
  const o = obj(parseJson(text, 'rbd info'), 'rbd info');
  const p = o.parent === undefined ? undefined : obj(o.parent, 'rbd info parent');
  return {
    name: str(o.name, 'rbd info name'),
    id: str(o.id, 'rbd info id'),
    size: num(o.size, 'rbd info size'),
    features: Array.isArray(o.features) ? o.features.map((f) => str(f, 'rbd info features')) : [],
    parent: p
      ? {
          pool: str(p.pool, 'parent pool'),
          namespace: typeof p.pool_namespace === 'string' ? p.pool_namespace : '',
          image: str(p.image, 'parent image'),
          snapshot: str(p.snapshot, 'parent snapshot'),
          overlap: typeof p.overlap === 'number' ? p.overlap : 0,
        }
      : undefined,
    protected: o.protected === undefined ? undefined : o.protected === 'true' || o.protected === true,
  };
}

export interface SnapInfo {
  id: number;
  name: string;
  size: number;
  protected: boolean;
}

/** `rbd snap ls --format json`: protected is the string "true"/"false". */
export function parseSnapLs(text: string): SnapInfo[] {
  const a = parseJson(text, 'rbd snap ls');
  if (!Array.isArray(a)) throw new Error('rbd snap ls: expected an array');
  return a.map((x, i) => {
    const o = obj(x, `rbd snap ls [${i}]`);
    return {
      id: num(o.id, 'snap id'),
      name: str(o.name, 'snap name'),
      size: num(o.size, 'snap size'),
      protected: o.protected === 'true' || o.protected === true,
    };
  });
}

export interface Watcher {
  /** `127.0.0.1:0/3021954` (the client's address: host and nonce). */
  address: string;
  client: number;
  cookie: number | string;
}

/** `rbd status --format json`: `{"watchers":[{"address":…,"client":…,"cookie":…}]}`. */
export function parseStatus(text: string): Watcher[] {
  const o = obj(parseJson(text, 'rbd status'), 'rbd status');
  if (!Array.isArray(o.watchers)) throw new Error('rbd status: no watchers list');
  return o.watchers.map((x, i) => {
    const w = obj(x, `rbd status watcher ${i}`);
    return {
      address: str(w.address, 'watcher address'),
      client: num(w.client, 'watcher client'),
      cookie: typeof w.cookie === 'number' || typeof w.cookie === 'string' ? w.cookie : 0,
    };
  });
}

export interface Mapping {
  id: string;
  pool: string;
  namespace: string;
  name: string;
  /** undefined for the image head (rbd prints "-"). */
  snap: string | undefined;
  device: string;
}

/** `rbd showmapped --format json`: an array of {id, pool, namespace, name, snap, device}. */
export function parseShowMapped(text: string): Mapping[] {
  const a = parseJson(text, 'rbd showmapped');
  if (!Array.isArray(a)) throw new Error('rbd showmapped: expected an array');
  return a.map((x, i) => {
    const o = obj(x, `rbd showmapped [${i}]`);
    const snap = str(o.snap, 'mapping snap');
    return {
      id: String(o.id),
      pool: str(o.pool, 'mapping pool'),
      namespace: typeof o.namespace === 'string' ? o.namespace : '',
      name: str(o.name, 'mapping name'),
      snap: snap === '-' || snap === '' ? undefined : snap,
      device: str(o.device, 'mapping device'),
    };
  });
}

/** `rbd map` prints the device on its last line. */
export function parseMapOutput(text: string): string {
  const dev = text.trim().split('\n').pop()?.trim() ?? '';
  if (!/^\/dev\/rbd\d+$/.test(dev))
    throw new Error(`rbd map printed "${text.trim().slice(0, 120)}", not a /dev/rbdN device`);
  return dev;
}

/** Which part of `pool/image[@snap]` rbd could not find, from its stderr; undefined when it is not a "missing" error. */
export function missingWhat(stderr: string): 'pool' | 'image' | 'snapshot' | undefined {
  if (/error opening pool\b.*\(2\)/.test(stderr)) return 'pool';
  if (/error opening image\b.*\(2\)/.test(stderr)) return 'image';
  if (/error setting snapshot context.*\(2\)/.test(stderr)) return 'snapshot';
  return undefined;
}

/** The meaningful line of rbd's stderr (it prints log lines with timestamps before its own message). */
export function rbdReason(stderr: string): string {
  const lines = stderr
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '' && !/\d+% complete/.test(l));
  const own = lines.filter((l) => /^rbd:/.test(l) || /^error /.test(l));
  return (own.pop() ?? lines.pop() ?? '').replace(/^rbd:\s*/, '');
}

/** One `rbd` command (argv from the builders above); its result, failed or not, for the caller to explain. */
export function rbdCommand(run: Runner, args: string[], timeoutMs: number): Promise<RunResult> {
  return run.probe('rbd', args, { timeoutMs });
}
