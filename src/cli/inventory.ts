/**
 * One picture of what the hooks built, from three sources: the journal (what each hook says it
 * built, the source of truth), xenstore (does the backend path and the domain still exist?) and
 * the kernel (dm devices, loops, nbd). `status` prints it; `gc` acts on the orphans and leaks.
 *
 * States:
 *   active      recorded, built, its backend path and domain still exist
 *   Invalid     (or Overflow, out_of_data_space, Fail…) the device-mapper target says the device is broken
 *   adding      an add is running right now (its process is alive)
 *   incomplete  an add or remove was killed half-way (its process is gone)
 *   failed      a teardown failed and the record was kept
 *   orphan      recorded, but its backend path or its domain no longer exists in xenstore
 *   held        kept for a saved domain until its restore reattaches it (src/hotplug/lifecycle.ts)
 *   missing     recorded as built, but its device is not in the kernel any more
 *   leaked      in the kernel, named or backed like ours, but in no record; or a crash's leftover
 *               no record holds: a transient store or overlay file no loop or nbd server uses, a
 *               block-lvsnap snapshot LV, a block-thin volume, thin pool files nothing needs, a
 *               block-rbd transient clone this host made
 *   lost        a saved domain's disk whose transient data died with an earlier boot: its restore
 *               is refused until the marker is deleted
 */
import { existsSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import type { Config } from '../config/config.js';
import type { Runner } from '../devices/runner.js';
import { Journal, processAlive, recordStrings, type JournalEntry } from '../journal/journal.js';

export { recordStrings };
import type { XsOps } from '../xenstore/types.js';
import { DM_NAME_PREFIXES, HOOKS, paramsSource } from '../backends/index.js';
import type { Leftover } from '../backends/types.js';
import { bootId, listMarkers, markerPath, readMarkerSafe } from '../journal/saved.js';
import { sysBlockDir } from '../devices/sysfs.js';
import { staleClaims, thisHost, type StoreOwner } from '../lock/store-owner.js';
import { isOpenRecord, openRow } from './open.js';
import { parseUsage, readKernel, type DmDevice, type KernelState, type LoopDevice, type Usage } from './kernel.js';

export type RowState = 'active' | 'adding' | 'incomplete' | 'failed' | 'orphan' | 'leaked' | string;

export interface Row {
  domid: number | undefined;
  domain: string | undefined;
  vdev: string | undefined;
  hook: string | undefined;
  device: string | undefined;
  majmin: string | undefined;
  base: string | undefined;
  store: string | undefined;
  usage: Usage | undefined;
  state: RowState;
  /** Why the state is what it is, in a few words. */
  why: string | undefined;
  backendPath: string | undefined;
  /** For leaked rows: what kind of kernel object (or a store file; `saved`: a saved disk's marker). */
  kind: 'record' | 'dm' | 'loop' | 'nbd' | 'store' | 'saved' | 'claim' | 'lv' | 'thin' | 'rbd';
  entry?: JournalEntry;
  /** For a stale claim: its owner record. */
  owner?: StoreOwner;
  /** For what a hook's leftovers facet found: the hook's own description, given back to its collect. */
  leftover?: Leftover;
}

/** A row with the given fields; every other field is unknown (undefined). */
export function makeRow(fields: Partial<Row> & Pick<Row, 'kind' | 'state'>): Row {
  return {
    domid: undefined,
    domain: undefined,
    vdev: undefined,
    hook: undefined,
    device: undefined,
    majmin: undefined,
    base: undefined,
    store: undefined,
    usage: undefined,
    why: undefined,
    backendPath: undefined,
    ...fields,
  };
}

/** A row of what no ready record accounts for (state leaked unless given). */
function leakedRow(kind: Row['kind'], fields: Partial<Row> & { why: string }): Row {
  return makeRow({ kind, state: 'leaked', ...fields });
}

export interface Inventory {
  rows: Row[];
  /** True when xenstore was reachable, so orphan states mean something. */
  xenstore: boolean;
  dmAvailable: boolean;
  unreadable: { file: string; error: string }[];
  kernel: KernelState;
}

/** `backend/vbd/5/51712` (or absolute) → 5. */
export function domidOfPath(p: string): number | undefined {
  const m = /backend\/vbd3?\/(\d+)\/\d+$/.exec(p);
  return m ? Number(m[1]) : undefined;
}

function under(dir: string, file: string): boolean {
  return file.startsWith(`${dir.replace(/\/+$/, '')}/`);
}

function isOurDmName(name: string): boolean {
  return DM_NAME_PREFIXES.some((p) => name.startsWith(p));
}

function dmReferenced(d: DmDevice, refs: Set<string>): boolean {
  return (
    refs.has(d.name) ||
    refs.has(`/dev/mapper/${d.name}`) ||
    refs.has(`${d.major}:${d.minor}`) ||
    refs.has(`/dev/dm-${d.minor}`)
  );
}

function loopReferenced(l: LoopDevice, refs: Set<string>): boolean {
  return refs.has(l.name) || refs.has(`${l.major}:${l.minor}`);
}

/** The dm device a record's device is, when it is one. */
function dmOf(entry: JournalEntry, k: KernelState): DmDevice | undefined {
  const d = entry.device;
  if (!d) return undefined;
  return k.dm.find((x) => x.major === d.major && x.minor === d.minor);
}

async function exists(xs: XsOps, path: string): Promise<boolean> {
  return (await xs.tryRead(path)) !== undefined;
}

export interface InventoryDeps {
  config: Config;
  run: Runner;
  /** Absent when xenstore cannot be reached. */
  xs: XsOps | undefined;
  journal?: Journal;
  /** Overrides for tests. */
  kernel?: KernelState;
  alive?: (pid: number) => boolean;
  /** The clock leftovers' ages are judged by (ms; tests move it on). */
  now?: () => number;
}

export async function takeInventory(deps: InventoryDeps): Promise<Inventory> {
  const journal = deps.journal ?? new Journal(deps.config.stateDir);
  const alive = deps.alive ?? processAlive;
  const { entries, unreadable } = journal.list();
  const kernel = deps.kernel ?? (await readKernel(deps.run));
  const rows: Row[] = [];
  const allRefs = new Set<string>();
  for (const e of entries) for (const s of recordStrings(e)) allRefs.add(s);

  for (const e of entries) {
    if (isOpenRecord(e)) {
      rows.push(openRow(e, kernel, alive));
      continue;
    }
    const refs = recordStrings(e);
    const domid = e.disk.frontendId ?? domidOfPath(e.backendPath);
    let domain = e.disk.domainName;
    let state: RowState;
    let why: string | undefined;
    const dm = dmOf(e, kernel);
    const usage = dm ? parseUsage(dm.status, dm.table) : undefined;
    let gone: string | undefined;
    if (deps.xs) {
      if (!(await exists(deps.xs, e.backendPath))) gone = `backend ${e.backendPath} no longer exists`;
      else if (domid !== undefined && !(await exists(deps.xs, `/local/domain/${domid}`)))
        gone = `domain ${domid} no longer exists`;
      if (domid !== undefined && domain === undefined) domain = await deps.xs.tryRead(`/local/domain/${domid}/name`);
    }
    const owner = alive(e.pid) && e.pid !== process.pid;
    if (e.phase === 'held' && e.held) {
      // Held records have no backend path in xenstore by design; they wait for their restore.
      gone = undefined;
      domain = e.held.name ?? domain;
    }
    if (e.phase === 'held' && e.held && readMarkerSafe(deps.config, e.held.uuid, e.held.devid)) {
      state = 'held';
      why = `kept for saved domain ${e.held.name ?? e.held.uuid} since ${e.held.since} (was ${e.held.from}); its restore reattaches it. To give it up: delete ${markerPath(deps.config, e.held.uuid, e.held.devid)}, then gc --apply`;
    } else if (e.phase === 'held') {
      state = 'orphan';
      why = 'held for a saved domain whose marker is gone';
    } else if (e.phase === 'adding' && owner) {
      state = 'adding';
      why = `process ${e.pid} is adding it`;
    } else if (gone) {
      state = 'orphan';
      why = gone;
    } else if (usage?.problem) {
      state = usage.problem;
      why = `dm status says ${usage.problem}`;
    } else if (e.phase === 'ready') {
      state = 'active';
      if (e.device && !dm && kernel.dmAvailable && !existsSync(sysBlockDir(e.device))) {
        state = 'missing';
        why = `${e.device.path} (${e.device.major}:${e.device.minor}) is not in the kernel any more`;
      }
    } else if (e.phase === 'failed') {
      state = 'failed';
      why = 'a teardown failed; the record was kept';
    } else {
      state = 'incomplete';
      why = `${e.phase === 'adding' ? 'add' : 'remove'} by process ${e.pid} stopped half-way`;
    }
    const store = [...refs].find((s) => under(deps.config.storeDir, s));
    rows.push({
      kind: 'record',
      entry: e,
      backendPath: e.backendPath,
      domid,
      domain,
      vdev: e.disk.vdev,
      hook: e.script,
      device: e.device?.path ?? dm?.name,
      majmin: e.device ? `${e.device.major}:${e.device.minor}` : undefined,
      base: paramsSource(e.script, e.disk.params),
      store,
      usage,
      state,
      why,
    });
  }

  // Kernel objects that look like ours but no record mentions.
  const leakedDm = kernel.dm.filter((d) => isOurDmName(d.name) && !dmReferenced(d, allRefs));
  const leakedDmDeps = new Set<string>();
  for (const d of leakedDm)
    for (const l of d.table) for (const w of l.split(/\s+/)) if (/^\d+:\d+$/.test(w)) leakedDmDeps.add(w);
  for (const d of leakedDm) {
    const usage = parseUsage(d.status, d.table);
    rows.push(
      leakedRow('dm', {
        device: `/dev/mapper/${d.name}`,
        majmin: `${d.major}:${d.minor}`,
        usage,
        why: 'device-mapper device named like ours that no record mentions',
      }),
    );
  }
  for (const l of kernel.loops) {
    if (loopReferenced(l, allRefs)) continue;
    const backing = l.backFile?.replace(/ \(deleted\)$/, '');
    const inStore = backing !== undefined && under(deps.config.storeDir, backing);
    const underLeak = leakedDmDeps.has(`${l.major}:${l.minor}`);
    if (!inStore && !underLeak) continue;
    rows.push(
      leakedRow('loop', {
        device: l.name,
        majmin: `${l.major}:${l.minor}`,
        base: inStore ? undefined : backing,
        store: inStore ? backing : undefined,
        why: inStore
          ? `loop device on ${backing} in the store directory that no record mentions`
          : 'loop device under a leaked device-mapper device',
      }),
    );
  }
  rows.push(
    ...leakedStores(deps.config, allRefs, kernel),
    ...lostSaved(deps.config),
    ...staleOwnClaims(deps.config, entries, kernel),
  );
  rows.push(...(await hookLeftovers(deps, entries, kernel)));
  for (const n of kernel.nbds) {
    if (allRefs.has(n.name)) continue;
    const file = n.cmdline.find((a) => under(deps.config.storeDir, a));
    if (!file) continue;
    rows.push(
      leakedRow('nbd', {
        device: n.name,
        store: file,
        why: `nbd served by process ${n.pid} for ${file} that no record mentions`,
      }),
    );
  }
  return { rows, xenstore: deps.xs !== undefined, dmAvailable: kernel.dmAvailable, unreadable, kernel };
}

/** Names transient stores and overlays are given (block-cow, block-qcow): only these are ever taken as leftovers. */
const TRANSIENT_FILES: { dir: string; name: RegExp }[] = [
  { dir: '', name: /^transient-\d+-\d+\.cow$/ },
  { dir: '', name: /^transient-\d+-\d+\.cow\.tail$/ },
  { dir: 'qcow', name: /^transient-\d+-\d+-[0-9a-f]+\.qcow2$/ },
];

const LEFTOVER_AGE_MS = 60_000;

function olderThan(file: string, ms: number): boolean {
  try {
    return Date.now() - statSync(file).mtimeMs > ms;
  } catch {
    return false;
  }
}

function listDir(dir: string): string[] {
  try {
    return readdirSync(dir);
  } catch {
    return [];
  }
}

/**
 * Transient store and overlay files that nothing uses: no record names them, no loop backs them,
 * no nbd server serves them. A crash or a reboot leaves them (the journal is in /run); their data
 * died with the devices that held it. Persistent stores never match these names.
 */
function leakedStores(config: Config, refs: Set<string>, kernel: KernelState): Row[] {
  const rows: Row[] = [];
  for (const t of TRANSIENT_FILES) {
    const dir = t.dir ? join(config.storeDir, t.dir) : config.storeDir;
    for (const n of listDir(dir)
      .filter((f) => t.name.test(f))
      .sort()) {
      const file = join(dir, n);
      if (refs.has(file)) continue;
      // An add journals its store before it makes it, but one may start after the journal was
      // read here: a file younger than a minute is nobody's leftover yet.
      if (!olderThan(file, LEFTOVER_AGE_MS)) continue;
      if (kernel.loops.some((l) => l.backFile?.replace(/ \(deleted\)$/, '') === file)) continue;
      if (kernel.nbds.some((b) => b.cmdline.includes(file))) continue;
      rows.push(
        leakedRow('store', {
          store: file,
          why: 'transient store file that no record, loop or nbd server uses (left by a crash or a reboot)',
        }),
      );
    }
  }
  return rows;
}

/**
 * This host's claims on persistent stores (lock/store-owner.ts) that nothing holds: from an
 * earlier boot, or for a backend path no record knows, with no loop on the store. Without them
 * being dropped, other hosts sharing the storage would stay refused after a crash here.
 */
function staleOwnClaims(config: Config, entries: JournalEntry[], kernel: KernelState): Row[] {
  const stores: string[] = [];
  for (const dir of [config.storeDir, join(config.storeDir, 'qcow')]) {
    for (const n of listDir(dir)) if (n.endsWith('.owner')) stores.push(join(dir, n.slice(0, -'.owner'.length)));
  }
  const recorded = new Set(entries.map((e) => e.backendPath));
  // Claims a save kept for its domain's restore are held, not stale (lostSaved shows them).
  const kept = new Set(listMarkers(config).flatMap(({ marker }) => marker.claims ?? []));
  return staleClaims(stores, (bp) => recorded.has(bp))
    .filter(({ store }) => !kept.has(store))
    .filter(
      ({ store }) =>
        !kernel.loops.some((l) => l.backFile?.replace(/ \(deleted\)$/, '') === store) &&
        !kernel.nbds.some((n) => n.cmdline.includes(store)),
    )
    .map(({ store, owner }) =>
      leakedRow('claim', {
        store,
        backendPath: owner.backendPath,
        owner,
        why: `this host's claim on ${store} (${owner.boot === thisHost().boot ? `for ${owner.backendPath}, which no record knows` : `from an earlier boot, ${owner.since}`}); other hosts are refused the store while it stands`,
      }),
    );
}

/** What each hook's leftovers facet finds: crash leftovers only the hook can recognise as its own. */
async function hookLeftovers(deps: InventoryDeps, entries: JournalEntry[], kernel: KernelState): Promise<Row[]> {
  const dmNames = new Set(kernel.dm.map((d) => d.name));
  const looped = (f: string) => kernel.loops.some((l) => l.backFile?.replace(/ \(deleted\)$/, '') === f);
  const ctx = {
    config: deps.config,
    run: deps.run,
    entries,
    kernel: { dmNames, looped },
    now: (deps.now ?? Date.now)(),
  };
  const rows: Row[] = [];
  for (const [hook, backend] of Object.entries(HOOKS)) {
    for (const l of (await backend.leftovers?.(ctx)) ?? []) {
      rows.push(
        leakedRow(l.kind, {
          hook,
          device: l.device,
          majmin: l.majmin,
          base: l.base,
          store: l.store,
          why: l.why,
          leftover: l,
        }),
      );
    }
  }
  return rows;
}

/**
 * Saved disks whose transient data lived in an earlier boot's devices: their restore is refused.
 * And persistent disks whose claims a save kept: held for their restore.
 */
function lostSaved(config: Config): Row[] {
  const boot = bootId();
  const markers = listMarkers(config);
  const row = (m: (typeof markers)[number]['marker'], state: string, store: string | undefined, why: string): Row =>
    leakedRow('saved', {
      domain: m.name,
      vdev: m.vdev,
      hook: m.script,
      base: paramsSource(m.script, m.params),
      store,
      state,
      why,
    });
  const claims = markers
    .filter(({ marker }) => marker.claims)
    .map(({ file, marker: m }) =>
      row(
        m,
        'held',
        m.claims?.join(', '),
        `this host's claim on ${m.claims?.join(', ')} is kept for saved domain ${m.name ?? m.key} since ${m.savedAt} (was ${m.from}), so that no other host takes the store before its restore. To give it up: delete ${file}, then gc --apply`,
      ),
    );
  return claims.concat(
    markers
      .filter(({ marker }) => !marker.claims && (marker.bootId !== boot || !marker.held))
      .map(({ file, marker: m }) =>
        row(
          m,
          'lost',
          undefined,
          `saved ${m.savedAt} ${m.held ? 'in an earlier boot; its ' + m.transient + " died with that boot's devices" : 'but its ' + m.transient + ' could not be kept (see the hotplug log)'}, so its restore is refused (delete ${file} to start the domain afresh with the same uuid)`,
        ),
      ),
  );
}
