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
 *   leaked      in the kernel, named or backed like ours, but in no record
 */
import { join } from 'node:path';
import type { Config } from '../config/config.js';
import type { Runner } from '../devices/runner.js';
import { Journal, processAlive, type JournalEntry } from '../journal/journal.js';
import type { XsOps } from '../xenstore/types.js';
import { DM_NAME_PREFIXES } from '../backends/index.js';
import { parseUsage, readKernel, type DmDevice, type KernelState, type LoopDevice, type NbdDevice, type Usage } from './kernel.js';

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
  /** For leaked rows: what kind of kernel object. */
  kind: 'record' | 'dm' | 'loop' | 'nbd';
  entry?: JournalEntry;
}

export interface Inventory {
  rows: Row[];
  /** True when xenstore was reachable, so orphan states mean something. */
  xenstore: boolean;
  dmAvailable: boolean;
  unreadable: { file: string; error: string }[];
  kernel: KernelState;
}

/** Every string anywhere in a record's steps and device (devices, names, files it mentions). */
export function recordStrings(entry: JournalEntry): Set<string> {
  const out = new Set<string>();
  const walk = (v: unknown): void => {
    if (typeof v === 'string') out.add(v);
    else if (typeof v === 'number') out.add(String(v));
    else if (Array.isArray(v)) v.forEach(walk);
    else if (v && typeof v === 'object') Object.values(v).forEach(walk);
  };
  for (const s of entry.steps) walk(s.data);
  if (entry.device) {
    out.add(entry.device.path);
    out.add(`${entry.device.major}:${entry.device.minor}`);
  }
  return out;
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
  return refs.has(d.name) || refs.has(`/dev/mapper/${d.name}`) || refs.has(`${d.major}:${d.minor}`) || refs.has(`/dev/dm-${d.minor}`);
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
      else if (domid !== undefined && !(await exists(deps.xs, `/local/domain/${domid}`))) gone = `domain ${domid} no longer exists`;
      if (domid !== undefined && domain === undefined) domain = await deps.xs.tryRead(`/local/domain/${domid}/name`);
    }
    const owner = alive(e.pid) && e.pid !== process.pid;
    if (e.phase === 'adding' && owner) {
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
      if (e.device && !dm && kernel.dmAvailable && !kernel.loops.some((l) => l.major === e.device?.major && l.minor === e.device?.minor) && !kernel.nbds.some((n) => n.name === e.device?.path)) {
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
      kind: 'record', entry: e, backendPath: e.backendPath, domid, domain, vdev: e.disk.vdev, hook: e.script,
      device: e.device?.path ?? dm?.name, majmin: e.device ? `${e.device.major}:${e.device.minor}` : undefined,
      base: e.disk.params.trim().split(/\s+/)[0], store, usage, state, why,
    });
  }

  // Kernel objects that look like ours but no record mentions.
  const leakedDm = kernel.dm.filter((d) => isOurDmName(d.name) && !dmReferenced(d, allRefs));
  const leakedDmDeps = new Set<string>();
  for (const d of leakedDm) for (const l of d.table) for (const w of l.split(/\s+/)) if (/^\d+:\d+$/.test(w)) leakedDmDeps.add(w);
  for (const d of leakedDm) {
    const usage = parseUsage(d.status, d.table);
    rows.push({
      kind: 'dm', domid: undefined, domain: undefined, vdev: undefined, hook: undefined, device: `/dev/mapper/${d.name}`,
      majmin: `${d.major}:${d.minor}`, base: undefined, store: undefined, usage, state: 'leaked',
      why: 'device-mapper device named like ours that no record mentions', backendPath: undefined,
    });
  }
  for (const l of kernel.loops) {
    if (loopReferenced(l, allRefs)) continue;
    const backing = l.backFile?.replace(/ \(deleted\)$/, '');
    const inStore = backing !== undefined && under(deps.config.storeDir, backing);
    const underLeak = leakedDmDeps.has(`${l.major}:${l.minor}`);
    if (!inStore && !underLeak) continue;
    rows.push({
      kind: 'loop', domid: undefined, domain: undefined, vdev: undefined, hook: undefined, device: l.name,
      majmin: `${l.major}:${l.minor}`, base: inStore ? undefined : backing, store: inStore ? backing : undefined, usage: undefined,
      state: 'leaked', why: inStore ? `loop device on ${backing} in the store directory that no record mentions` : 'loop device under a leaked device-mapper device',
      backendPath: undefined,
    });
  }
  for (const n of kernel.nbds) {
    if (allRefs.has(n.name)) continue;
    const file = n.cmdline.find((a) => under(deps.config.storeDir, a));
    if (!file) continue;
    rows.push({
      kind: 'nbd', domid: undefined, domain: undefined, vdev: undefined, hook: undefined, device: n.name, majmin: undefined,
      base: undefined, store: file, usage: undefined, state: 'leaked', why: `nbd served by process ${n.pid} for ${file} that no record mentions`,
      backendPath: undefined,
    });
  }
  return { rows, xenstore: deps.xs !== undefined, dmAvailable: kernel.dmAvailable, unreadable, kernel };
}

export function lockFileFor(config: Config, backendPath: string, journalFileName: (p: string) => string): string {
  return join(config.stateDir, 'locks', `path-${journalFileName(backendPath).replace(/\.json$/, '')}`);
}
