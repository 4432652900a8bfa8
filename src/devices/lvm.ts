/**
 * LVM2 (lvm 2.03): name checks, argv builders for the `lvm` multi-call binary, the JSON report
 * parser, and helpers over a Runner. Every command runs as `lvm <command> ...` (one binary, the
 * same on every distribution), never through a shell; LV arguments are always `VG/LV` after the
 * options, checked against LVM's own naming rules first, so a name can never be read as an option.
 *
 * Names (lvm(8) "VALID NAMES"): the characters a-z A-Z 0-9 + _ . - only; not starting with `-`;
 * not `.` or `..`; an LV is not `snapshot` or `pvmove` and contains none of LVM's internal
 * suffixes (`_cdata`, `_tmeta`, ...). LVM limits a full name to 127 characters.
 */
import { CommandError, type Runner } from './runner.js';

const NAME_CHARS = /^[A-Za-z0-9+_.-]+$/;
const RESERVED_LV = new Set(['snapshot', 'pvmove']);
const RESERVED_PARTS = [
  '_cdata',
  '_cmeta',
  '_corig',
  '_cpool',
  '_cvol',
  '_wcorig',
  '_iorig',
  '_mimage',
  '_mlog',
  '_pmspare',
  '_rimage',
  '_rmeta',
  '_tdata',
  '_tmeta',
  '_vorigin',
  '_vdata',
];
export const MAX_LVM_NAME = 127;

/** Why `name` is not a valid VG name, or undefined when it is. */
export function vgNameProblem(name: string): string | undefined {
  if (name === '') return 'the volume group name is empty';
  if (!NAME_CHARS.test(name)) return `"${name}" may contain only letters, digits and + _ . -`;
  if (name.startsWith('-')) return `"${name}" must not start with "-"`;
  if (name === '.' || name === '..') return `"${name}" is not a name`;
  if (name.length > MAX_LVM_NAME) return `"${name.slice(0, 20)}…" is longer than ${MAX_LVM_NAME} characters`;
  return undefined;
}

/** Why `name` is not a valid LV name, or undefined when it is. */
export function lvNameProblem(name: string): string | undefined {
  const vg = vgNameProblem(name);
  if (vg) return vg.replace('the volume group name', 'the logical volume name');
  if (RESERVED_LV.has(name) || name.startsWith('pvmove')) return `"${name}" is reserved by LVM`;
  const part = RESERVED_PARTS.find((p) => name.includes(p));
  if (part) return `"${name}" contains "${part}", which LVM reserves for its internal volumes`;
  return undefined;
}

export interface LvRef {
  vg: string;
  lv: string;
}

/** `vg/lv` → {vg, lv}; throws with the reason when either name is invalid. */
export function parseLvRef(s: string): LvRef {
  const parts = s.split('/');
  if (parts.length !== 2) throw new Error(`"${s}" is not of the form VG/LV`);
  const [vg, lv] = parts as [string, string];
  const p = vgNameProblem(vg) ?? lvNameProblem(lv);
  if (p) throw new Error(p);
  if (vg.length + lv.length + 1 > MAX_LVM_NAME) throw new Error(`"${s}" is longer than ${MAX_LVM_NAME} characters`);
  return { vg, lv };
}

export function lvPath(r: LvRef): string {
  const p = vgNameProblem(r.vg) ?? lvNameProblem(r.lv);
  if (p) throw new Error(`invalid logical volume ${r.vg}/${r.lv}: ${p}`);
  return `${r.vg}/${r.lv}`;
}

/** The device-mapper name LVM gives `vg/lv`: hyphens doubled, joined by one hyphen. */
export function lvDmName(r: LvRef): string {
  return `${r.vg.replace(/-/g, '--')}-${r.lv.replace(/-/g, '--')}`;
}

// ---------------------------------------------------------------------------------------------
// argv builders (for the `lvm` binary)

export const LVS_FIELDS =
  'vg_name,lv_name,lv_attr,lv_size,origin,pool_lv,data_percent,metadata_percent,segtype,lv_dm_path,lv_kernel_major,lv_kernel_minor,lv_tags';

export function lvsArgs(targets: readonly LvRef[] | string[] = []): string[] {
  const sel = targets.map((t) =>
    typeof t === 'string' ? (vgNameProblem(t) ? fail(`invalid volume group ${JSON.stringify(t)}`) : t) : lvPath(t),
  );
  return ['lvs', '--reportformat', 'json', '--units', 'b', '--nosuffix', '-o', LVS_FIELDS, ...sel];
}

/**
 * Every LV carrying `tag` in every VG, with whether it is open and when it was made (epoch
 * seconds): `lvs @TAG` selects by tag across all volume groups.
 */
export function lvsTaggedArgs(tag: string): string[] {
  return [
    'lvs',
    '--reportformat',
    'json',
    '--units',
    'b',
    '--nosuffix',
    '--config',
    'report/time_format="%s"',
    '-o',
    `${LVS_FIELDS},lv_device_open,lv_time`,
    `@${checkTag(tag)}`,
  ];
}

function fail(msg: string): never {
  throw new Error(msg);
}

function checkMiB(mib: number, what: string): string {
  if (!Number.isInteger(mib) || mib < 1) throw new Error(`${what} must be a whole number of MiB >= 1, got ${mib}`);
  return `${mib}m`;
}

/**
 * `lvcreate -s`: a classic snapshot with a CoW area of `cowMiB`, or (no size) a thin snapshot of
 * a thin origin, activated at once (`-kn`: thin snapshots are otherwise created with the
 * activation-skip flag and stay inactive). `-y` answers LVM's questions; `-Wn -Zn` keep it from
 * wiping signatures on the new volume (it must show the origin's data).
 */
export function lvcreateSnapshotArgs(
  origin: LvRef,
  name: string,
  cowMiB?: number,
  o: { addTag?: string } = {},
): string[] {
  const p = lvNameProblem(name);
  if (p) throw new Error(`invalid snapshot name: ${p}`);
  const size = cowMiB === undefined ? ['-kn'] : ['-L', checkMiB(cowMiB, 'snapshot size')];
  const tag = o.addTag === undefined ? [] : ['--addtag', checkTag(o.addTag)];
  return ['lvcreate', '-q', '-y', '-s', '-n', name, ...size, ...tag, '--', lvPath(origin)];
}

function checkTag(t: string): string {
  if (!/^[A-Za-z0-9_+.\-/=!:&#]{1,128}$/.test(t)) throw new Error(`invalid LVM tag ${JSON.stringify(t)}`);
  return t;
}

export function lvremoveArgs(r: LvRef): string[] {
  return ['lvremove', '-q', '-f', '--', lvPath(r)];
}

/** `lvextend -L +<n>m VG/LV` (a snapshot's CoW area, or any LV). */
export function lvextendArgs(r: LvRef, addMiB: number): string[] {
  return ['lvextend', '-q', '-L', `+${checkMiB(addMiB, 'extension')}`, '--', lvPath(r)];
}

/** Activate (`-ay`), ignoring the activation-skip flag (`-K`). */
export function lvActivateArgs(r: LvRef): string[] {
  return ['lvchange', '-q', '-ay', '-K', '--', lvPath(r)];
}

// ---------------------------------------------------------------------------------------------
// The JSON report

export interface LvInfo {
  vg: string;
  lv: string;
  attr: string;
  sizeBytes: bigint;
  origin: string | undefined;
  pool: string | undefined;
  /** Percent of a snapshot's CoW area, or of a thin volume's / pool's data, in use. */
  dataPercent: number | undefined;
  metadataPercent: number | undefined;
  segtype: string;
  dmPath: string | undefined;
  major: number | undefined;
  minor: number | undefined;
  /** LVM tags (`--addtag`). */
  tags: string[];
  /** attr[0]: `s` snapshot, `V` thin volume, `t` thin pool, `o` origin, `-` plain. */
  kind: 'snapshot' | 'thin' | 'thin-pool' | 'origin' | 'other';
  /** attr[4] `I`/`S`: an invalid (overflowed) snapshot, or the kernel reports the volume failed. */
  invalid: boolean;
  /** attr[4] `a`. */
  active: boolean;
  /** `lv_device_open` (asked for by lvsTaggedArgs only): some process or device holds it open. */
  open?: boolean;
  /** `lv_time` as epoch seconds (lvsTaggedArgs only). */
  createdS?: number;
}

function num(v: unknown): number | undefined {
  if (typeof v !== 'string' || v.trim() === '') return undefined;
  const n = Number(v);
  return Number.isFinite(n) ? n : undefined;
}

function str(v: unknown): string | undefined {
  return typeof v === 'string' && v !== '' ? v : undefined;
}

/** `lvs --reportformat json --units b --nosuffix -o LVS_FIELDS`; duplicate rows folded. */
export function parseLvs(text: string): LvInfo[] {
  if (text.trim() === '') return [];
  const doc = JSON.parse(text) as { report?: { lv?: Record<string, unknown>[] }[] };
  if (!doc || !Array.isArray(doc.report)) throw new Error('lvs --reportformat json: no "report" array');
  const out: LvInfo[] = [];
  const seen = new Set<string>();
  for (const r of doc.report) {
    for (const d of r.lv ?? []) {
      const vg = str(d.vg_name);
      const lv = str(d.lv_name);
      const attr = typeof d.lv_attr === 'string' ? d.lv_attr : '';
      if (!vg || !lv || attr.length < 5) throw new Error(`lvs: unexpected row ${JSON.stringify(d)}`);
      const key = `${vg}/${lv}`;
      if (seen.has(key)) continue;
      seen.add(key);
      const size = typeof d.lv_size === 'string' && /^\d+$/.test(d.lv_size) ? BigInt(d.lv_size) : 0n;
      const t = attr[0];
      const major = num(d.lv_kernel_major);
      const minor = num(d.lv_kernel_minor);
      out.push({
        vg,
        lv,
        attr,
        sizeBytes: size,
        origin: str(d.origin),
        pool: str(d.pool_lv),
        dataPercent: num(d.data_percent),
        metadataPercent: num(d.metadata_percent),
        segtype: typeof d.segtype === 'string' ? d.segtype : '',
        dmPath: str(d.lv_dm_path),
        major: major !== undefined && major >= 0 ? major : undefined,
        minor: minor !== undefined && minor >= 0 ? minor : undefined,
        tags: typeof d.lv_tags === 'string' && d.lv_tags !== '' ? d.lv_tags.split(',') : [],
        kind:
          t === 's' || t === 'S'
            ? 'snapshot'
            : t === 'V'
              ? 'thin'
              : t === 't'
                ? 'thin-pool'
                : t === 'o'
                  ? 'origin'
                  : 'other',
        invalid: attr[4] === 'I' || attr[4] === 'S' || t === 'S' || attr[8] === 'X',
        active: attr[4] === 'a',
        ...(d.lv_device_open === undefined ? {} : { open: d.lv_device_open === 'open' }),
        ...(num(d.lv_time) === undefined ? {} : { createdS: num(d.lv_time) }),
      });
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Helpers over a Runner

const NOT_FOUND = /Failed to find logical volume|Volume group "[^"]*" not found|not found in volume group/;

export function isLvNotFound(stderr: string): boolean {
  return NOT_FOUND.test(stderr);
}

/** One LV's report, or undefined when it (or its VG) does not exist. */
export async function lvInfo(run: Runner, r: LvRef): Promise<LvInfo | undefined> {
  const res = await run.probe('lvm', lvsArgs([r]));
  if (res.failed) {
    if (isLvNotFound(res.stderr)) return undefined;
    throw new CommandError(res);
  }
  return parseLvs(res.stdout).find((l) => l.vg === r.vg && l.lv === r.lv);
}

/** `lvremove -f`; an LV that is not there counts as removed. Resolves true if it removed one. */
export async function lvRemove(run: Runner, r: LvRef): Promise<boolean> {
  const res = await run.probe('lvm', lvremoveArgs(r));
  if (!res.failed) return true;
  if (isLvNotFound(res.stderr)) return false;
  throw new CommandError(res);
}

/** Activate an LV, ignoring the activation-skip flag. */
export async function lvActivate(run: Runner, r: LvRef): Promise<void> {
  await run.run('lvm', lvActivateArgs(r));
}

/** `lvcreate -s` (lvcreateSnapshotArgs). */
export async function lvCreateSnapshot(
  run: Runner,
  origin: LvRef,
  name: string,
  cowMiB: number | undefined,
  o: { addTag?: string } = {},
): Promise<void> {
  await run.run('lvm', lvcreateSnapshotArgs(origin, name, cowMiB, o), { timeoutMs: 30_000 });
}

/** `lvextend` of an LV by `addMiB` (lvextendArgs). */
export async function lvExtendBy(run: Runner, r: LvRef, addMiB: number): Promise<void> {
  await run.run('lvm', lvextendArgs(r, addMiB), { timeoutMs: 60_000 });
}

/** `lvextend -L <bytes>b DEVICE`: an LV given by its device path, to a total size (LVM rounds up to whole extents). */
export async function lvExtendTo(run: Runner, device: string, bytes: number): Promise<void> {
  if (!Number.isSafeInteger(bytes) || bytes < 1)
    throw new Error(`lvextend: size must be a whole number of bytes, got ${bytes}`);
  if (!device.startsWith('/'))
    throw new Error(`lvextend: the device must be an absolute path: ${JSON.stringify(device)}`);
  await run.run('lvm', ['lvextend', '-q', '-L', `${bytes}b`, '--', device]);
}

/** Every LV tagged `tag` (lvsTaggedArgs); none when LVM is not installed or cannot report. */
export async function lvsTagged(run: Runner, tag: string): Promise<LvInfo[]> {
  const r = await run.probe('lvm', lvsTaggedArgs(tag));
  if (r.failed) return [];
  try {
    return parseLvs(r.stdout);
  } catch {
    return [];
  }
}

/** `lvextend --poolmetadatasize +<n>m VG/POOL`: a thin pool LV's metadata. */
export async function lvExtendPoolMetadataBy(run: Runner, pool: LvRef, addMiB: number): Promise<void> {
  await run.run(
    'lvm',
    ['lvextend', '-q', '--poolmetadatasize', `+${checkMiB(addMiB, 'extension')}`, '--', lvPath(pool)],
    { timeoutMs: 60_000 },
  );
}
