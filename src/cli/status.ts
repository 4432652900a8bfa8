/**
 * `xen-blockhooks status`: one line per device the hooks built (and per leaked kernel object),
 * like `lvs`. See inventory.ts for the states.
 */
import { humanBytes, table } from './format.js';
import type { Inventory, Row } from './inventory.js';

export const STATUS_HELP = `Usage: xen-blockhooks status [--json]

Show every device the hooks built: domain (id and name), vdev, hook, device, major:minor,
base image, copy-on-write store, store usage and percent (from dmsetup status), and state:
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

Options:
  --json     one JSON document instead of the table
  -h, --help this text

Exit status: 0 shown (whatever the states), 1 could not be read, 2 bad usage.`;

function usageCells(r: Row): [string, string] {
  const u = r.usage;
  if (!u || u.used === undefined || u.total === undefined || u.total === 0) return ['', ''];
  const pct = ((100 * u.used) / u.total).toFixed(1);
  if (u.unit === 'blocks') return [`${u.used}/${u.total} blk`, `${pct}%`];
  return [`${humanBytes(u.used * 512)}/${humanBytes(u.total * 512)}`, `${pct}%`];
}

export function rowJson(r: Row): Record<string, unknown> {
  const u = r.usage;
  return {
    kind: r.kind,
    domid: r.domid ?? null,
    domain: r.domain ?? null,
    vdev: r.vdev ?? null,
    hook: r.hook ?? null,
    device: r.device ?? null,
    majmin: r.majmin ?? null,
    base: r.base ?? null,
    store: r.store ?? null,
    target: u?.target ?? null,
    used: u?.used ?? null,
    size: u?.total ?? null,
    unit: u ? u.unit : null,
    percent: u && u.used !== undefined && u.total ? Math.round((1000 * u.used) / u.total) / 10 : null,
    state: r.state,
    why: r.why ?? null,
    backendPath: r.backendPath ?? null,
  };
}

export function renderStatus(inv: Inventory, json: boolean): string {
  if (json) {
    return JSON.stringify({
      xenstore: inv.xenstore,
      deviceMapper: inv.dmAvailable,
      devices: inv.rows.map(rowJson),
      unreadable: inv.unreadable,
    }, null, 2);
  }
  const lines: string[] = [];
  if (inv.rows.length === 0) lines.push('No devices recorded or leaked.');
  else {
    lines.push(table(
      ['DOM', 'NAME', 'VDEV', 'HOOK', 'DEVICE', 'MAJ:MIN', 'BASE', 'STORE', 'USED/SIZE', 'USE%', 'STATE'],
      inv.rows.map((r) => {
        const [used, pct] = usageCells(r);
        return [
          r.domid === undefined ? '-' : String(r.domid), r.domain ?? '-', r.vdev ?? '-', r.hook ?? '-', r.device ?? '-',
          r.majmin ?? '-', r.base ?? '-', r.store ?? '-', used || '-', pct || '-', r.state,
        ];
      }),
    ));
    const notes = inv.rows.filter((r) => r.state !== 'active' && r.why);
    for (const r of notes) lines.push(`  ${r.device ?? r.backendPath ?? '?'}: ${r.state}: ${r.why}`);
  }
  if (!inv.xenstore) lines.push('Note: xenstore is not reachable, so orphaned records cannot be told apart from active ones.');
  if (!inv.dmAvailable) lines.push('Note: this kernel has no device-mapper; usage is unknown.');
  for (const u of inv.unreadable) lines.push(`Warning: unreadable record ${u.file}: ${u.error}`);
  return lines.join('\n');
}
