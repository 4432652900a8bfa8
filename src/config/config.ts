/**
 * One configuration file, `/etc/xen/blockhooks.conf`, in the `key = value` style of xl.conf:
 *
 *     # where copy-on-write stores, overlays and thin pools live (root-only, created 0700)
 *     store_dir = /var/lib/xen-blockhooks
 *     # base images must lie below one of these (space-separated)
 *     image_dirs = /var/lib/xen/images /srv/xen /mnt /media
 *     cow.chunk = 64K
 *
 * A missing file means the defaults below. Environment variables override the file (tests and
 * `simulate` use them): XEN_BLOCKHOOKS_CONF names another file, and each key has an override
 * named XEN_BLOCKHOOKS_<KEY> with dots and dashes as underscores, e.g. XEN_BLOCKHOOKS_STORE_DIR,
 * XEN_BLOCKHOOKS_IMAGE_DIRS (colon- or space-separated), XEN_BLOCKHOOKS_COW_CHUNK.
 */
import { readFileSync } from 'node:fs';
import { isAbsolute } from 'node:path';
import { notASize, sizeKiB, sizeMiB } from '../units/size.js';

export interface Config {
  /** Copy-on-write stores, qcow2 overlays, thin pool files. */
  storeDir: string;
  /** Journal, reference records and our own locks (tmpfs: gone at reboot, like the devices). */
  stateDir: string;
  /** Directories base images may come from. */
  imageDirs: string[];
  /** The stock scripts' lock directory (`/var/run/xen-hotplug`), for Xen's `block` lock. */
  xenLockDir: string;
  /** Where `block` finds `block-<type>` for the xend type dispatch. */
  xenScriptDir: string;
  /** Log file; empty string turns file logging off. */
  logFile: string;
  /** Milliseconds a remove keeps retrying a busy device. */
  busyRetryMs: number;
  /** Milliseconds to wait for a lock before giving up. */
  lockTimeoutMs: number;
  cow: { chunkKiB: number; defaultSizeMiB: number };
  /**
   * dataDevice/metadataDevice: block devices (e.g. LVs) for the pool instead of the sparse files in
   * store_dir; both or neither. Empty: files.
   */
  thin: {
    blockKiB: number;
    dataMiB: number;
    metadataMiB: number;
    keepPool: boolean;
    dataDevice: string;
    metadataDevice: string;
  };
  qcow: { cache: string };
  watch: { thresholdPercent: number; stepPercent: number; intervalMs: number };
}

export const DEFAULT_CONFIG_FILE = '/etc/xen/blockhooks.conf';

export function defaultConfig(): Config {
  return {
    storeDir: '/var/lib/xen-blockhooks',
    stateDir: '/run/xen-blockhooks',
    imageDirs: ['/var/lib/xen/images', '/srv/xen', '/mnt', '/media'],
    xenLockDir: '/var/run/xen-hotplug',
    xenScriptDir: '/etc/xen/scripts',
    logFile: '/var/log/xen/xen-hotplug.log',
    busyRetryMs: 10_000,
    lockTimeoutMs: 20_000,
    cow: { chunkKiB: 64, defaultSizeMiB: 1024 },
    thin: { blockKiB: 64, dataMiB: 4096, metadataMiB: 64, keepPool: false, dataDevice: '', metadataDevice: '' },
    qcow: { cache: 'writeback' },
    watch: { thresholdPercent: 80, stepPercent: 25, intervalMs: 2000 },
  };
}

export class ConfigError extends Error {
  override name = 'ConfigError';
}

type Setter = (c: Config, v: string, where: string) => void;

function dir(v: string, where: string): string {
  if (!isAbsolute(v)) throw new ConfigError(`${where}: "${v}" is not an absolute path`);
  return v.replace(/\/+$/, '') || '/';
}

function int(v: string, where: string, min = 0): number {
  if (!/^\d+$/.test(v) || Number(v) < min) throw new ConfigError(`${where}: "${v}" is not a whole number ≥ ${min}`);
  return Number(v);
}

/** A size in KiB (`64K`, `64`: a bare number is KiB), rounded up to whole KiB; more than zero. */
function kib(v: string, where: string): number {
  const n = sizeKiB(v, { bare: 'K' });
  if (n === undefined) throw new ConfigError(`${where}: ${notASize(v, { bare: 'K' })}`);
  if (n <= 0) throw new ConfigError(`${where}: "${v}" must be more than zero`);
  return n;
}

/** A size in MiB (`512M`, `1.5G`, `512`: a bare number is MiB), rounded up to whole MiB; 1 MiB at least. */
function mib(v: string, where: string): number {
  const n = sizeMiB(v);
  if (n === undefined) throw new ConfigError(`${where}: ${notASize(v)}`);
  if (n < 1) throw new ConfigError(`${where}: "${v}" must be at least 1 MiB`);
  return n;
}

function bool(v: string, where: string): boolean {
  if (/^(1|yes|true|on)$/i.test(v)) return true;
  if (/^(0|no|false|off)$/i.test(v)) return false;
  throw new ConfigError(`${where}: "${v}" is not yes or no`);
}

const SETTERS: Record<string, Setter> = {
  store_dir: (c, v, w) => {
    c.storeDir = dir(v, w);
  },
  state_dir: (c, v, w) => {
    c.stateDir = dir(v, w);
  },
  image_dirs: (c, v, w) => {
    c.imageDirs = v
      .split(/[\s:]+/)
      .filter(Boolean)
      .map((d) => dir(d, w));
  },
  xen_lock_dir: (c, v, w) => {
    c.xenLockDir = dir(v, w);
  },
  xen_script_dir: (c, v, w) => {
    c.xenScriptDir = dir(v, w);
  },
  log_file: (c, v, w) => {
    c.logFile = v === '' || v === 'none' ? '' : dir(v, w);
  },
  busy_retry_ms: (c, v, w) => {
    c.busyRetryMs = int(v, w);
  },
  lock_timeout_ms: (c, v, w) => {
    c.lockTimeoutMs = int(v, w, 1);
  },
  'cow.chunk': (c, v, w) => {
    const k = kib(v, w);
    if (k < 4 || k > 512 || (k & (k - 1)) !== 0)
      throw new ConfigError(`${w}: chunk "${v}" must be a power of two from 4K to 512K`);
    c.cow.chunkKiB = k;
  },
  'cow.default_size': (c, v, w) => {
    c.cow.defaultSizeMiB = mib(v, w);
  },
  'thin.block': (c, v, w) => {
    c.thin.blockKiB = kib(v, w);
  },
  'thin.data_size': (c, v, w) => {
    c.thin.dataMiB = mib(v, w);
  },
  'thin.metadata_size': (c, v, w) => {
    c.thin.metadataMiB = mib(v, w);
  },
  'thin.keep_pool': (c, v, w) => {
    c.thin.keepPool = bool(v, w);
  },
  'thin.data_device': (c, v, w) => {
    c.thin.dataDevice = v === '' ? '' : dir(v, w);
  },
  'thin.metadata_device': (c, v, w) => {
    c.thin.metadataDevice = v === '' ? '' : dir(v, w);
  },
  'qcow.cache': (c, v, w) => {
    if (!/^(none|writeback|writethrough|directsync|unsafe)$/.test(v))
      throw new ConfigError(`${w}: unknown qemu cache mode "${v}"`);
    c.qcow.cache = v;
  },
  'watch.threshold': (c, v, w) => {
    c.watch.thresholdPercent = int(v.replace(/%$/, ''), w, 1);
  },
  'watch.step': (c, v, w) => {
    c.watch.stepPercent = int(v.replace(/%$/, ''), w, 1);
  },
  'watch.interval_ms': (c, v, w) => {
    c.watch.intervalMs = int(v, w, 100);
  },
};

export const CONFIG_KEYS = Object.keys(SETTERS);

/** Levenshtein distance (insertions, deletions, substitutions). */
function editDistance(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const cur = [i];
    for (let j = 1; j <= b.length; j++) {
      cur[j] = Math.min(
        (prev[j] as number) + 1,
        (cur[j - 1] as number) + 1,
        (prev[j - 1] as number) + (a[i - 1] === b[j - 1] ? 0 : 1),
      );
    }
    prev = cur;
  }
  return prev[b.length] as number;
}

/**
 * The known key an unknown one most likely meant, or undefined: the same key with `-` for `_` or
 * in another case (`store-dir`), a key without its section (`data_size` → `thin.data_size`) or in
 * the wrong one (`cow.data_size`), or one a small typing slip away (`stor_dir`).
 */
export function suggestKey(key: string): string | undefined {
  const norm = key.toLowerCase().replace(/-/g, '_');
  if (CONFIG_KEYS.includes(norm)) return norm;
  const tail = norm.slice(norm.lastIndexOf('.') + 1);
  const sameTail = CONFIG_KEYS.filter((k) => k.slice(k.lastIndexOf('.') + 1) === tail);
  if (sameTail.length === 1) return sameTail[0];
  let best: string | undefined;
  let bestD = Infinity;
  let tie = false;
  for (const k of CONFIG_KEYS) {
    const d = Math.min(
      editDistance(norm, k),
      k.includes('.') && !norm.includes('.') ? editDistance(norm, k.slice(k.indexOf('.') + 1)) : Infinity,
    );
    if (d < bestD) [best, bestD, tie] = [k, d, false];
    else if (d === bestD) tie = true;
  }
  return best !== undefined && !tie && bestD <= Math.max(1, Math.floor(norm.length / 4)) ? best : undefined;
}

/** The sentence for a key this build does not know. */
export function unknownKeyMessage(key: string): string {
  const s = suggestKey(key);
  return s
    ? `unknown key \`${key}\`; did you mean \`${s}\`?`
    : `unknown key \`${key}\` (known keys: ${CONFIG_KEYS.join(', ')})`;
}

/**
 * Parse the text of a configuration file on top of `base`, reporting each bad line to `problem`
 * (as `file:line: why`) and going on with the next.
 */
export function parseConfigLines(text: string, file: string, base: Config, problem: (e: ConfigError) => void): Config {
  // A plain-data copy: structuredClone would load Node's messaging internals on first use (0.2 s of a
  // hook's start in the Xen tier's dom0).
  const c = JSON.parse(JSON.stringify(base)) as Config;
  text.split('\n').forEach((raw, i) => {
    const line = raw.replace(/(^|\s)#.*$/, '').trim();
    if (line === '') return;
    const m = /^([A-Za-z0-9_.-]+)\s*=\s*(.*)$/.exec(line);
    const where = `${file}:${i + 1}`;
    try {
      if (!m) throw new ConfigError(`${where}: expected "key = value", found "${raw.trim()}"`);
      const set = SETTERS[m[1] as string];
      if (!set) throw new ConfigError(`${where}: ${unknownKeyMessage(m[1] as string)}`);
      set(c, (m[2] as string).replace(/^"(.*)"$/, '$1'), where);
    } catch (e) {
      if (e instanceof ConfigError) problem(e);
      else throw e;
    }
  });
  return c;
}

/** Parse the text of a configuration file on top of `base`; the first bad line throws. */
export function parseConfig(text: string, file: string, base: Config = defaultConfig()): Config {
  return parseConfigLines(text, file, base, (e) => {
    throw e;
  });
}

/** The configuration in force: defaults, then the file (if it exists), then the environment. */
export function loadConfig(env: NodeJS.ProcessEnv = process.env): Config {
  return loadConfigWith(env, (e) => {
    throw e;
  }).config;
}

export interface ConfigReport {
  config: Config;
  /** The file read (or that would have been). */
  file: string;
  /** Whether it exists; without it the defaults (and the environment) are in force. */
  found: boolean;
  /** Every bad line or value, each a sentence naming where it is. */
  problems: string[];
}

/** Like loadConfig, but every problem is collected (for `xen-blockhooks check`) instead of the first thrown. */
export function checkConfig(env: NodeJS.ProcessEnv = process.env): ConfigReport {
  const problems: string[] = [];
  const r = loadConfigWith(env, (e) => problems.push(e.message));
  return { ...r, problems };
}

function loadConfigWith(
  env: NodeJS.ProcessEnv,
  problem: (e: ConfigError) => void,
): { config: Config; file: string; found: boolean } {
  const file = env.XEN_BLOCKHOOKS_CONF ?? DEFAULT_CONFIG_FILE;
  let c = defaultConfig();
  let text: string | undefined;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT')
      problem(new ConfigError(`cannot read ${file}: ${(e as Error).message}`));
  }
  if (text !== undefined) c = parseConfigLines(text, file, c, problem);
  for (const key of CONFIG_KEYS) {
    const name = `XEN_BLOCKHOOKS_${key.replace(/[.-]/g, '_').toUpperCase()}`;
    const v = env[name];
    if (v === undefined) continue;
    try {
      (SETTERS[key] as Setter)(c, v, name);
    } catch (e) {
      if (e instanceof ConfigError) problem(e);
      else throw e;
    }
  }
  if (env.XEN_SCRIPT_DIR !== undefined && env.XEN_BLOCKHOOKS_XEN_SCRIPT_DIR === undefined) {
    try {
      c.xenScriptDir = dir(env.XEN_SCRIPT_DIR, 'XEN_SCRIPT_DIR');
    } catch (e) {
      if (e instanceof ConfigError) problem(e);
      else throw e;
    }
  }
  if ((c.thin.dataDevice === '') !== (c.thin.metadataDevice === '')) {
    problem(
      new ConfigError(
        `${file}: thin.data_device and thin.metadata_device go together (the pool is on two devices or on two files); set both or neither`,
      ),
    );
  }
  return { config: c, file, found: text !== undefined };
}
