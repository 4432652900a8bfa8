/**
 * `xen-blockhooks status`: one line per device the hooks built (and per leaked kernel object),
 * like `lvs`: `-o` picks the fields, `-S` the rows, `--units` the sizes, `--noheadings` and
 * `--separator` make it easy to read from a script. See inventory.ts for the states.
 */
import { UsageError } from '../disk/errors.js';
import { humanBytes } from './format.js';
import type { Inventory, Row } from './inventory.js';
import type { Usage } from './kernel.js';

export const STATUS_FIELDS_HELP = `Fields (-o; the JSON keys have the same names):
  domid       DOM      the domain id
  domain      NAME     the domain name (also: name)
  vdev        VDEV     the virtual disk (xvda, sda1…)
  hook        HOOK     the hook that built it (block-cow…)
  device      DEVICE   the block device handed to the backend
  majmin      MAJ:MIN  its major:minor
  base        BASE     the base image (or LV, RBD image)
  store       STORE    the copy-on-write store, overlay or transient file
  target      TARGET   the device-mapper target (snapshot, thin, thin-pool)
  used        USED     store space in use (--units)
  size        SIZE     store size (--units)
  percent     USE%     used as a percentage of size
  state       STATE    see States
  why         WHY      why the state is what it is
  backendPath BACKEND  the backend path in xenstore (also: backend)
  kind        KIND     record, or the kind of leaked object (dm, loop, nbd, store, lv, thin, rbd…)
Default: domid,domain,vdev,hook,device,size,percent,state, shortened to fit 80 columns.`;

export const STATUS_HELP = `Usage: xen-blockhooks status [-o FIELD,...] [-S COND] [--units U] [--noheadings]
                             [--separator STR] [--json]

Show every device the hooks built, like lvs(8): one row per device (and per leaked object),
then, for each row not active, why. States:
  active      built and in use
  Invalid     the device-mapper target has failed (a full snapshot store): the guest sees I/O errors
  adding      an add is running now
  incomplete  an add or remove was killed half-way (gc can finish it once xenstore forgot the device)
  failed      a teardown failed; the record was kept for gc
  orphan      the backend path or domain no longer exists in xenstore (gc removes it)
  held        kept for a saved domain (xl save) until its restore reattaches it
  missing     recorded as built, but the device is no longer in the kernel
  leaked      a kernel device named or backed like ours that no record mentions, or a transient
              store file nothing uses (left by a crash or a reboot) (gc removes it)
  lost        a saved domain's disk whose transient changes died with an earlier boot: its
              restore is refused until the marker named is deleted
  open        partitions mapped in dom0 by "xen-blockhooks open" (hook open; WHY names them);
              "xen-blockhooks close" takes them away

${STATUS_FIELDS_HELP}

Options:
  -o, --options FIELDS  the fields to show, comma-separated: "+FIELD,..." adds to the default,
                        "all" shows every field; may be given again (the lists are joined)
  -S, --select COND     only the rows where COND holds: FIELD=VALUE, FIELD!=VALUE, and for
                        domid, used, size and percent also <, <=, >, >= (sizes in bytes);
                        values compare without regard to case; several conditions joined by
                        "," or "&&", or given as several -S, must all hold
                        (e.g. -S state=orphan, -S domain=web,vdev=xvda, -S "percent>=80")
  --units U             sizes in h (human: K, M, G, the default), b (bytes), s (512-byte
                        sectors), k, m, g or t (binary units, two decimals)
  --noheadings          no heading line, no notes after the table
  --separator STR       STR between the fields instead of aligned columns
  --json                one JSON document instead of the table: sizes in bytes; with -o or -S
                        only those fields or rows
  -h, --help            this text

Exit status: 0 shown (whatever the states), 1 could not be read, 2 bad usage.`;

type Units = 'h' | 'b' | 's' | 'k' | 'm' | 'g' | 't';
const UNITS: readonly Units[] = ['h', 'b', 's', 'k', 'm', 'g', 't'];

/** Used and size in bytes, when the target says (thin-pool: blocks times the pool's block size). */
function usageBytes(u: Usage | undefined): { used: number | undefined; size: number | undefined } {
  if (!u) return { used: undefined, size: undefined };
  const mult = u.unit === 'sectors' ? 512 : u.blockSectors !== undefined ? u.blockSectors * 512 : undefined;
  if (mult === undefined) return { used: undefined, size: undefined };
  return {
    used: u.used === undefined ? undefined : u.used * mult,
    size: u.total === undefined ? undefined : u.total * mult,
  };
}

function percentOf(u: Usage | undefined): number | undefined {
  return u && u.used !== undefined && u.total ? Math.round((1000 * u.used) / u.total) / 10 : undefined;
}

export function formatSize(bytes: number, units: Units): string {
  switch (units) {
    case 'h':
      return humanBytes(bytes);
    case 'b':
      return `${bytes}B`;
    case 's':
      return `${Math.ceil(bytes / 512)}S`;
    default:
      return `${(bytes / 1024 ** (UNITS.indexOf(units) - 2)).toFixed(2)}${units}`;
  }
}

interface Field {
  name: string;
  header: string;
  /** The value, as JSON gives it. */
  value: (r: Row) => string | number | null;
  /** Sizes: formatted with --units in the table. */
  size?: true;
  /** Default fields only: in the default view a long value is cut to fit 80 columns, at its end or in its middle (paths keep their tail). */
  shrink?: { min: number; at: 'end' | 'middle'; last?: true };
}

const FIELDS: readonly Field[] = [
  { name: 'domid', header: 'DOM', value: (r) => r.domid ?? null },
  { name: 'domain', header: 'NAME', value: (r) => r.domain ?? null, shrink: { min: 6, at: 'end' } },
  { name: 'vdev', header: 'VDEV', value: (r) => r.vdev ?? null },
  { name: 'hook', header: 'HOOK', value: (r) => r.hook ?? null, shrink: { min: 8, at: 'end', last: true } },
  { name: 'device', header: 'DEVICE', value: (r) => r.device ?? null, shrink: { min: 10, at: 'middle' } },
  { name: 'majmin', header: 'MAJ:MIN', value: (r) => r.majmin ?? null },
  { name: 'base', header: 'BASE', value: (r) => r.base ?? null },
  { name: 'store', header: 'STORE', value: (r) => r.store ?? null },
  { name: 'target', header: 'TARGET', value: (r) => r.usage?.target ?? null },
  { name: 'used', header: 'USED', value: (r) => usageBytes(r.usage).used ?? null, size: true },
  { name: 'size', header: 'SIZE', value: (r) => usageBytes(r.usage).size ?? null, size: true },
  { name: 'percent', header: 'USE%', value: (r) => percentOf(r.usage) ?? null },
  { name: 'state', header: 'STATE', value: (r) => r.state },
  { name: 'why', header: 'WHY', value: (r) => r.why ?? null },
  { name: 'backendPath', header: 'BACKEND', value: (r) => r.backendPath ?? null },
  { name: 'kind', header: 'KIND', value: (r) => r.kind },
];
const ALIASES: Record<string, string> = { name: 'domain', backend: 'backendpath' };
const DEFAULT_FIELDS = ['domid', 'domain', 'vdev', 'hook', 'device', 'size', 'percent', 'state'];
const NUMERIC = new Set(['domid', 'used', 'size', 'percent']);
export const STATUS_WIDTH = 80;

function field(name: string): Field {
  const key = name.trim().toLowerCase();
  const f = FIELDS.find((x) => x.name.toLowerCase() === (ALIASES[key] ?? key));
  if (!f) throw new UsageError(`unknown field "${name.trim()}" (${FIELDS.map((x) => x.name).join(', ')})`);
  return f;
}

interface Condition {
  field: Field;
  op: '=' | '!=' | '<' | '<=' | '>' | '>=';
  value: string;
}

function parseSelect(text: string): Condition[] {
  return text.split(/,|&&/).map((c) => {
    const m = /^\s*([A-Za-z:%]+)\s*(!=|<=|>=|=|<|>)\s*(.*?)\s*$/.exec(c);
    if (!m)
      throw new UsageError(
        `-S "${text}": "${c.trim()}" is not FIELD=VALUE, FIELD!=VALUE or FIELD<NUMBER (<, <=, >, >=)`,
      );
    const f = field(m[1] as string);
    const op = m[2] as Condition['op'];
    const value = m[3] as string;
    if (op !== '=' && op !== '!=') {
      if (!NUMERIC.has(f.name))
        throw new UsageError(
          `-S "${text}": ${op} compares numbers, and ${f.name} is not one (${[...NUMERIC].join(', ')} are)`,
        );
      if (!/^\d+(\.\d+)?$/.test(value))
        throw new UsageError(`-S "${text}": ${f.name}${op} needs a number, not "${value}"`);
    }
    return { field: f, op, value };
  });
}

function holds(c: Condition, r: Row): boolean {
  const v = c.field.value(r);
  if (c.op === '=' || c.op === '!=') {
    const same = String(v ?? '').toLowerCase() === c.value.toLowerCase();
    return c.op === '=' ? same : !same;
  }
  if (typeof v !== 'number') return false;
  const n = Number(c.value);
  return c.op === '<' ? v < n : c.op === '<=' ? v <= n : c.op === '>' ? v > n : v >= n;
}

export interface StatusOptions {
  json?: boolean;
  /** -o values, as given. */
  fields?: string[];
  /** -S values, as given. */
  select?: string[];
  units?: string;
  noHeadings?: boolean;
  separator?: string;
}

/** Checks the options without the inventory: bad usage is found before anything is read. */
export function statusPlan(o: StatusOptions): {
  fields: Field[];
  explicit: boolean;
  conditions: Condition[];
  units: Units;
} {
  if (o.json && (o.units !== undefined || o.noHeadings || o.separator !== undefined)) {
    throw new UsageError(
      '--units, --noheadings and --separator shape the table; --json gives sizes in bytes and has no headings',
    );
  }
  const units = (o.units ?? 'h') as Units;
  if (!UNITS.includes(units)) throw new UsageError(`--units must be one of ${UNITS.join(', ')}, not "${o.units}"`);
  let names: string[] = [];
  const explicit = (o.fields ?? []).length > 0;
  for (const list of o.fields ?? []) {
    const parts = list.split(',').map((s) => s.trim());
    if (parts.some((p) => p === '' || p === '+')) throw new UsageError(`-o "${list}": an empty field name`);
    if (parts[0]?.startsWith('+')) {
      if (names.length === 0) names = [...DEFAULT_FIELDS];
      parts[0] = parts[0].slice(1);
    }
    // Like lvs, a second -o adds its fields to the first one's.
    for (const p of parts) {
      if (p.toLowerCase() === 'all') names.push(...FIELDS.map((f) => f.name));
      else names.push(field(p).name);
    }
  }
  if (!explicit) names = [...DEFAULT_FIELDS];
  const fields = [...new Set(names)].map(field);
  const conditions = (o.select ?? []).flatMap(parseSelect);
  return { fields, explicit, conditions, units };
}

/** Cuts `s` to `w` characters with an ellipsis: at the end, or in the middle so a path keeps its tail. */
export function shorten(s: string, w: number, at: 'end' | 'middle'): string {
  if (s.length <= w) return s;
  if (w <= 1) return s.slice(0, w);
  if (at === 'end') return `${s.slice(0, w - 1)}…`;
  const tail = Math.ceil((w - 1) / 2);
  return `${s.slice(0, w - 1 - tail)}…${s.slice(s.length - tail)}`;
}

export function rowJson(r: Row): Record<string, unknown> {
  const o: Record<string, unknown> = {};
  for (const f of FIELDS) o[f.name] = f.value(r);
  // Before the fields: `kind` first, as it always was; `unit` says what used and size count.
  return { kind: r.kind, ...o, unit: r.usage ? 'bytes' : null };
}

function cell(f: Field, r: Row, units: Units, short: boolean): string {
  const v = f.value(r);
  if (v === null) return '-';
  if (f.size && typeof v === 'number') return formatSize(v, units);
  if (f.name === 'percent' && typeof v === 'number') return `${v.toFixed(1)}%`;
  // The default view names devices as lvs does, without /dev/ (and /dev/mapper/).
  if (short && f.name === 'device' && typeof v === 'string') return v.replace(/^\/dev\/(?:mapper\/)?/, '');
  return String(v);
}

/**
 * Widths of the columns: until the line fits `width`, the widest shrinkable column loses a
 * character (the hook only once the name and the device are as narrow as they go).
 */
function fit(fields: Field[], natural: number[], width: number): number[] {
  const w = [...natural];
  const total = () => w.reduce((a, b) => a + b, 0) + 2 * (w.length - 1);
  const widest = (last: boolean) => {
    let pick = -1;
    fields.forEach((f, i) => {
      const min = Math.max(f.shrink?.min ?? Infinity, f.header.length);
      if (
        f.shrink &&
        !!f.shrink.last === last &&
        (w[i] as number) > min &&
        (pick < 0 || (w[i] as number) > (w[pick] as number))
      )
        pick = i;
    });
    return pick;
  };
  while (total() > width) {
    const pick = widest(false) >= 0 ? widest(false) : widest(true);
    if (pick < 0) break;
    w[pick] = (w[pick] as number) - 1;
  }
  return w;
}

export function renderStatus(inv: Inventory, opts: StatusOptions = {}): string {
  const plan = statusPlan(opts);
  const rows = inv.rows.filter((r) => plan.conditions.every((c) => holds(c, r)));
  if (opts.json) {
    const pick = (r: Row) =>
      plan.explicit ? Object.fromEntries(plan.fields.map((f) => [f.name, f.value(r)])) : rowJson(r);
    return JSON.stringify(
      {
        xenstore: inv.xenstore,
        deviceMapper: inv.dmAvailable,
        devices: rows.map(pick),
        unreadable: inv.unreadable,
      },
      null,
      2,
    );
  }
  const lines: string[] = [];
  const headings = !opts.noHeadings;
  if (rows.length === 0) {
    if (headings)
      lines.push(
        inv.rows.length === 0
          ? 'No devices recorded or leaked.'
          : `No device matches ${(opts.select ?? []).map((s) => `-S "${s}"`).join(' ')}.`,
      );
  } else {
    // The default view is shortened to fit; fields asked for by name are shown whole.
    const short = !plan.explicit && opts.separator === undefined;
    const cells = rows.map((r) => plan.fields.map((f) => cell(f, r, plan.units, short)));
    const header = plan.fields.map((f) => f.header);
    if (opts.separator !== undefined) {
      if (headings) lines.push(header.join(opts.separator));
      for (const c of cells) lines.push(c.join(opts.separator));
    } else {
      const natural = plan.fields.map((f, i) =>
        Math.max(f.header.length, ...cells.map((c) => (c[i] as string).length)),
      );
      const widths = short ? fit(plan.fields, natural, STATUS_WIDTH) : natural;
      const line = (cs: string[]) =>
        cs
          .map((c, i) => {
            const f = plan.fields[i] as Field;
            const w = widths[i] as number;
            const s = f.shrink ? shorten(c, w, f.shrink.at) : c;
            return i === cs.length - 1 ? s : s.padEnd(w);
          })
          .join('  ')
          .trimEnd();
      if (headings) lines.push(line(header));
      for (const c of cells) lines.push(line(c));
    }
    if (headings && !plan.fields.some((f) => f.name === 'why')) {
      for (const r of rows.filter((x) => x.state !== 'active' && x.why))
        lines.push(`  ${r.device ?? r.store ?? r.backendPath ?? '?'}: ${r.state}: ${r.why}`);
    }
  }
  if (headings) {
    if (!inv.xenstore)
      lines.push('Note: xenstore is not reachable, so orphaned records cannot be told apart from active ones.');
    if (!inv.dmAvailable) lines.push('Note: this kernel has no device-mapper; usage is unknown.');
    for (const u of inv.unreadable) lines.push(`Warning: unreadable record ${u.file}: ${u.error}`);
  }
  return lines.join('\n');
}

/** What --noheadings leaves out of the table but a person must still hear of: for stderr. */
export function statusWarnings(inv: Inventory): string[] {
  return inv.unreadable.map((u) => `xen-blockhooks status: warning: unreadable record ${u.file}: ${u.error}`);
}
