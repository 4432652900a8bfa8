/**
 * Disk specifications as the domain builders read them.
 *
 * xl (xl-disk-configuration(5), lexer tools/libs/util/libxlu_disk_l.l): comma-separated
 * `key=value` words and flags, whitespace before a word ignored; `target=` takes the rest of the
 * string, commas and spaces included (one trailing comma is dropped), so it comes last. Words
 * without `=` are positional: target, then format (skipped after a deprecated prefix such as
 * `phy:`), then vdev (`hdc:cdrom` also sets the device type), then access. The prefixes `iscsi:`,
 * `nbd:`, `enbd:`, `drbd:` set script=block-<prefix>; `raw: qcow: qcow2: vhd:` set the format;
 * `phy: file: aio: tap: tap2: tapdisk: ioemu:` are dropped; any other `word:` is an error.
 *
 * xm/xend: `<type>:<params>,<dev>[:cdrom|:disk],<mode>[,<backend-domain>]` — the prefix becomes
 * the backend's `type` node, the rest of the first field its `params` (no commas possible).
 */
import { vdevToDevid } from './vdev.js';

export class DiskSpecError extends Error {
  override name = 'DiskSpecError';
}

export interface XlDisk {
  syntax: 'xl';
  target: string | undefined;
  vdev: string;
  devid: number;
  /** `w` or `r` as libxl writes it. */
  mode: 'w' | 'r';
  script: string | undefined;
  format: string | undefined;
  backendType: string | undefined;
  backendDomain: string | undefined;
  cdrom: boolean;
  /** libxl's default: discard on for writable disks unless `no-discard`. */
  discard: boolean;
  directIoSafe: boolean;
  trusted: boolean | undefined;
  specification: string | undefined;
}

export interface XmDisk {
  syntax: 'xm';
  /** The prefix, e.g. `cow`; written to the backend's `type`. */
  type: string;
  params: string;
  vdev: string;
  devid: number;
  /** `r`, `w` or `w!` as xend wrote it. */
  mode: string;
  cdrom: boolean;
  backendDomain: string | undefined;
}

export type Disk = XlDisk | XmDisk;

const FORMATS = new Set(['', 'raw', 'qcow', 'qcow2', 'vhd', 'empty', 'qed']);
const ACCESS: Record<string, 'r' | 'w'> = { r: 'r', ro: 'r', w: 'w', rw: 'w', '': 'w' };
const KEYS = new Set([
  'format',
  'devtype',
  'access',
  'backend',
  'backendtype',
  'specification',
  'vdev',
  'script',
  'colo-host',
  'colo-port',
  'colo-export',
  'active-disk',
  'hidden-disk',
  'grant_usage',
]);
const FLAGS = new Set(['cdrom', 'direct-io-safe', 'discard', 'no-discard', 'colo', 'no-colo', 'trusted', 'untrusted']);
const DROPPED_PREFIX = /^(tapdisk|tap2?|aio|ioemu|file|phy):/;
const FORMAT_PREFIX = /^(raw|qcow2?|vhd):/;
const SCRIPT_PREFIX = /^(iscsi|e?nbd|drbd):/;
const ANY_PREFIX = /^[a-z][a-z0-9]*:(?:[^a-z0-9]|$)/;

/** True when `spec` starts with a `word:` prefix xl would reject (so it can only be xm syntax). */
export function looksLikeXm(spec: string): boolean {
  const s = spec.trimStart();
  if (!ANY_PREFIX.test(s)) return false;
  return !(DROPPED_PREFIX.test(s) || FORMAT_PREFIX.test(s) || SCRIPT_PREFIX.test(s));
}

function fail(spec: string, word: string, why: string): never {
  throw new DiskSpecError(`disk spec "${spec}": ${why}${word ? ` at "${word}"` : ''}`);
}

export function parseXlDisk(spec: string): XlDisk {
  let target: string | undefined;
  let vdev: string | undefined;
  let format: string | undefined;
  let script: string | undefined;
  let access: 'r' | 'w' | undefined;
  let accessSet = false;
  let hadPrefix = false;
  let cdrom = false;
  let discard: boolean | undefined;
  let directIoSafe = false;
  let trusted: boolean | undefined;
  let backendType: string | undefined;
  let backendDomain: string | undefined;
  let specification: string | undefined;
  const once = (what: string, cur: string | undefined, v: string): string => {
    if (cur !== undefined && cur !== '') fail(spec, v, `${what} respecified`);
    return v;
  };
  const setFormat = (v: string): void => {
    if (!FORMATS.has(v)) fail(spec, v, 'unknown value for format');
    format = v === '' ? 'raw' : v;
  };
  const setAccess = (v: string): void => {
    const a = ACCESS[v];
    if (!a) fail(spec, v, 'unknown value for access (r, ro, w or rw)');
    access = a;
  };
  const vdevDevtype = (v: string): boolean => {
    const i = v.lastIndexOf(':');
    if (i < 0) return false;
    vdev = once('vdev', vdev, v.slice(0, i));
    const t = v.slice(i + 1);
    if (t === 'cdrom') cdrom = true;
    else if (t === 'disk') cdrom = false;
    else fail(spec, t, 'unknown deprecated type');
    return true;
  };

  let rest = spec;
  while (rest.length > 0) {
    const ws = /^[ \t\n]+/.exec(rest);
    if (ws) {
      rest = rest.slice(ws[0].length);
      continue;
    }
    if (rest.startsWith('target=')) {
      let v = rest.slice('target='.length);
      if (v.endsWith(',')) v = v.slice(0, -1);
      target = once('target', target, v);
      break;
    }
    const m = FORMAT_PREFIX.exec(rest) ?? SCRIPT_PREFIX.exec(rest) ?? DROPPED_PREFIX.exec(rest);
    if (m) {
      const p = m[1] as string;
      hadPrefix = true;
      if (FORMAT_PREFIX.test(m[0])) setFormat(p);
      else if (SCRIPT_PREFIX.test(m[0])) script = once('script', script, `block-${p}`);
      rest = rest.slice(m[0].length);
      continue;
    }
    if (ANY_PREFIX.test(rest)) {
      fail(
        spec,
        rest.slice(0, rest.indexOf(':') + 1),
        'unknown deprecated disk prefix (xm syntax such as "cow:…" is not valid under xl: write vdev=…,access=…,script=block-cow,target=…)',
      );
    }
    const comma = rest.indexOf(',');
    const word = comma < 0 ? rest : rest.slice(0, comma);
    rest = comma < 0 ? '' : rest.slice(comma + 1);
    const eq = word.indexOf('=');
    if (eq >= 0) {
      const key = word.slice(0, eq);
      const v = word.slice(eq + 1);
      if (!KEYS.has(key)) fail(spec, word, 'unknown parameter');
      switch (key) {
        case 'format':
          setFormat(v);
          break;
        case 'devtype':
          if (v === 'cdrom') cdrom = true;
          else if (v === 'disk') cdrom = false;
          else fail(spec, word, 'unknown value for devtype (disk or cdrom)');
          break;
        case 'access':
          setAccess(v);
          break;
        case 'backend':
          backendDomain = once('backend', backendDomain, v);
          break;
        case 'backendtype':
          if (!['phy', 'tap', 'qdisk', 'standalone'].includes(v)) fail(spec, word, 'unknown value for backendtype');
          backendType = v;
          break;
        case 'specification':
          if (v !== 'xen' && v !== 'virtio') fail(spec, word, 'unknown value for specification');
          specification = v;
          break;
        case 'vdev':
          vdev = once('vdev', vdev, v);
          break;
        case 'script':
          script = once('script', script, v);
          break;
        case 'grant_usage':
          if (v !== '0' && v !== '1') fail(spec, word, 'grant_usage must be 0 or 1');
          break;
        default:
          break; // colo settings: accepted, not used by block scripts
      }
      continue;
    }
    if (FLAGS.has(word)) {
      if (word === 'cdrom') cdrom = true;
      else if (word === 'discard') discard = true;
      else if (word === 'no-discard') discard = false;
      else if (word === 'direct-io-safe') directIoSafe = true;
      else if (word === 'trusted') trusted = true;
      else if (word === 'untrusted') trusted = false;
      continue;
    }
    // positional: target, format, vdev, access
    if (target === undefined) target = word;
    else if (!hadPrefix && format === undefined) {
      if (target === '' && vdevDevtype(word)) format = 'empty';
      else setFormat(word);
    } else if (vdev === undefined) {
      if (!vdevDevtype(word)) vdev = word;
    } else if (!accessSet) {
      accessSet = true;
      setAccess(word);
    } else fail(spec, word, 'too many positional parameters');
  }
  if (vdev === undefined || vdev === '') fail(spec, '', 'no vdev specified (add vdev=xvda)');
  const mode = access ?? 'w';
  return {
    syntax: 'xl',
    target,
    vdev,
    devid: vdevToDevid(vdev),
    mode,
    script,
    format,
    backendType,
    backendDomain,
    cdrom,
    discard: discard ?? mode === 'w',
    directIoSafe,
    trusted,
    specification,
  };
}

export function parseXmDisk(spec: string): XmDisk {
  const fields = spec.split(',');
  if (fields.length < 3 || fields.length > 4) {
    fail(
      spec,
      '',
      `xm syntax is "<type>:<params>,<dev>,<mode>" (found ${fields.length} comma-separated field${fields.length === 1 ? '' : 's'})`,
    );
  }
  const [uname, devField, modeField, backendField] = fields.map((f) => f.trim()) as [
    string,
    string,
    string,
    string | undefined,
  ];
  const colon = uname.indexOf(':');
  if (colon <= 0) fail(spec, uname, 'the first field needs a type prefix such as cow: or file:');
  const type = uname.slice(0, colon);
  if (!/^[a-z][a-z0-9_-]*$/.test(type)) fail(spec, type, 'the type prefix must be lower-case letters and digits');
  const params = uname.slice(colon + 1);
  if (params.trim() === '') fail(spec, uname, `nothing after "${type}:"`);
  let dev = devField.replace(/^ioemu:/, '');
  let cdrom = false;
  const i = dev.lastIndexOf(':');
  if (i >= 0) {
    const t = dev.slice(i + 1);
    if (t === 'cdrom') cdrom = true;
    else if (t !== 'disk') fail(spec, devField, 'the device may only end in :cdrom or :disk');
    dev = dev.slice(0, i);
  }
  if (!/^(r|w|w!|rw|ro)$/.test(modeField)) fail(spec, modeField, 'the mode must be r or w (or w!)');
  const mode = modeField === 'rw' ? 'w' : modeField === 'ro' ? 'r' : modeField;
  return {
    syntax: 'xm',
    type,
    params,
    vdev: dev,
    devid: vdevToDevid(dev),
    mode,
    cdrom,
    backendDomain: backendField || undefined,
  };
}

/** Parse in the syntax asked for, or guess: xm only when xl would reject the prefix. */
export function parseDisk(spec: string, syntax: 'xl' | 'xm' | 'auto' = 'auto'): Disk {
  if (syntax === 'xm' || (syntax === 'auto' && looksLikeXm(spec))) return parseXmDisk(spec);
  return parseXlDisk(spec);
}
