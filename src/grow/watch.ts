/**
 * One pass of `xen-blockhooks watch`: for every device the journal knows, read its usage from the
 * kernel (`dmsetup status`; `lvs` for LVM snapshots) and grow it by watch.step percent once it is
 * at or past watch.threshold percent, like LVM's snapshot_autoextend_threshold/percent. Devices
 * already dropped by the kernel (Invalid, Overflow, a failed pool) are reported as problems and
 * logged at error level: loudly, never silently, but once. Given a WatchMemory (the long-running
 * watch keeps one), a pass logs a problem only when it is new or its state changed since the last
 * pass, and a device whose problem has gone is logged as recovered, once.
 *
 * Each disk is looked at under its backend-path lock, taken without waiting: a disk whose hook is
 * running right now is skipped this pass (reported as `busy`) and looked at on the next.
 */
import type { Config } from '../config/config.js';
import type { Runner } from '../devices/runner.js';
import { lvInfo } from '../devices/lvm.js';
import { Journal, type JournalEntry } from '../journal/journal.js';
import { tryAcquireFlock } from '../lock/flock.js';
import type { Logger } from '../log/logger.js';
import { THIN_STEP } from '../backends/thin.js';
import { cowParts, growCowStore, growLv, growThinPool, lvsnapRef, snapshotState, thinPoolUsage, type GrowAction } from './grow.js';
import { pathLockPath } from '../lock/paths.js';

export type FindingState = 'ok' | 'grown' | 'invalid' | 'full' | 'busy' | 'error';

export interface WatchFinding {
  backendPath: string;
  script: string;
  /** The dm device, store, pool or LV looked at. */
  device: string;
  /** Percent in use before any growth, when known. */
  usedPercent?: number;
  state: FindingState;
  message: string;
}

export interface WatchReport {
  /** Records looked at. */
  checked: number;
  grown: GrowAction[];
  findings: WatchFinding[];
  /** The findings that need a person: invalid, full, error. */
  problems: WatchFinding[];
  /** The problems this pass logged: all of them without a memory; with one, only those new or changed since the last pass. */
  news: WatchFinding[];
  /** Devices whose reported problem is gone this pass (logged once, at info level); always empty without a memory. */
  recovered: { finding: WatchFinding; was: FindingState }[];
}

/**
 * What earlier passes reported: the problem state of each device (by backend path; the shared thin
 * pool as `pool`). A device no longer in the journal is forgotten; a busy one keeps its entry.
 */
export class WatchMemory {
  readonly reported = new Map<string, FindingState>();
}

export interface WatchOptions {
  journal?: Journal;
  /** Report each problem once and each recovery once (the long-running watch); without it every pass reports every problem. */
  memory?: WatchMemory;
}

function isProblem(state: FindingState): boolean {
  return state === 'invalid' || state === 'full' || state === 'error';
}

function findingKey(f: WatchFinding): string {
  return f.device === 'pool' && f.script === 'block-thin' ? 'pool' : f.backendPath;
}

/** Logs the problems that are news, and the recoveries, and moves the memory on. */
function logFindings(report: WatchReport, log: Logger, memory: WatchMemory | undefined): void {
  if (!memory) report.news = report.problems;
  else {
    const seen = new Set<string>();
    for (const f of report.findings) {
      const key = findingKey(f);
      seen.add(key);
      const was = memory.reported.get(key);
      if (isProblem(f.state)) {
        if (was !== f.state) report.news.push(f);
        memory.reported.set(key, f.state);
      } else if (was !== undefined && f.state !== 'busy') {
        report.recovered.push({ finding: f, was });
        memory.reported.delete(key);
      }
    }
    for (const key of [...memory.reported.keys()]) if (!seen.has(key)) memory.reported.delete(key);
  }
  for (const f of report.news) log.error(`watch: ${f.message}`, f.state === 'invalid' ? { outcome: 'invalid' } : undefined);
  for (const r of report.recovered) log.info(`watch: ${r.finding.backendPath === r.finding.device ? r.finding.device : `${r.finding.device} (${r.finding.backendPath})`} recovered (was ${r.was}): ${r.finding.message}`);
}


function pct(used: bigint, total: bigint): number {
  return total === 0n ? 100 : Number((used * 10000n) / total) / 100;
}

function msg(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

async function watchCow(entry: JournalEntry, config: Config, run: Runner, log: Logger, report: WatchReport): Promise<void> {
  const p = cowParts(entry);
  if (!p) return; // read-only: nothing can fill
  const s = await snapshotState(run, p.dmName);
  if (s.state !== 'active') {
    const m = `${p.dmName} (${entry.backendPath}) is ${s.state === 'invalid' ? 'Invalid' : s.state}: the copy-on-write store overflowed and the kernel dropped the snapshot; the guest gets I/O errors and its changes are lost. Remove and add the disk again.`;
    report.findings.push({ backendPath: entry.backendPath, script: entry.script, device: p.dmName, state: 'invalid', message: m });
    return;
  }
  const used = pct(s.allocatedSectors + s.metadataSectors, s.totalSectors);
  if (used < config.watch.thresholdPercent) {
    report.findings.push({ backendPath: entry.backendPath, script: entry.script, device: p.dmName, usedPercent: used, state: 'ok', message: `${used}% of the store used` });
    return;
  }
  const g = await growCowStore(entry, undefined, { config, run, log });
  report.grown.push(g);
  report.findings.push({ backendPath: entry.backendPath, script: entry.script, device: p.dmName, usedPercent: used, state: 'grown', message: `${used}% used ≥ ${config.watch.thresholdPercent}%: store grown to ${g.afterBytes} bytes` });
}

async function watchLv(entry: JournalEntry, config: Config, run: Runner, log: Logger, report: WatchReport): Promise<void> {
  const ref = lvsnapRef(entry);
  if (!ref) return;
  const name = `${ref.vg}/${ref.lv}`;
  const l = await lvInfo(run, ref);
  if (!l) {
    const m = `${name} (${entry.backendPath}) is recorded but LVM does not know it any more`;
    report.findings.push({ backendPath: entry.backendPath, script: entry.script, device: name, state: 'error', message: m });
    return;
  }
  if (l.invalid) {
    const m = `${name} (${entry.backendPath}) is Invalid (attr ${l.attr}): the snapshot overflowed and the kernel dropped it; the guest gets I/O errors and its changes are lost. Remove and add the disk again.`;
    report.findings.push({ backendPath: entry.backendPath, script: entry.script, device: name, state: 'invalid', message: m });
    return;
  }
  if (l.kind === 'thin') {
    const pool = l.pool ? await lvInfo(run, { vg: ref.vg, lv: l.pool }) : undefined;
    if (!pool) return;
    const data = pool.dataPercent ?? 0;
    const meta = pool.metadataPercent ?? 0;
    let grew = false;
    if (data >= config.watch.thresholdPercent) {
      report.grown.push(await growLv(entry, undefined, { config, run, log }, 'data'));
      grew = true;
    }
    if (meta >= config.watch.thresholdPercent) {
      report.grown.push(await growLv(entry, undefined, { config, run, log }, 'metadata'));
      grew = true;
    }
    report.findings.push({ backendPath: entry.backendPath, script: entry.script, device: `${ref.vg}/${l.pool}`, usedPercent: Math.max(data, meta), state: grew ? 'grown' : 'ok', message: `pool data ${data}% metadata ${meta}%` });
    return;
  }
  const used = l.dataPercent ?? 0;
  if (used < config.watch.thresholdPercent) {
    report.findings.push({ backendPath: entry.backendPath, script: entry.script, device: name, usedPercent: used, state: 'ok', message: `${used}% of the snapshot used` });
    return;
  }
  const g = await growLv(entry, undefined, { config, run, log });
  report.grown.push(g);
  report.findings.push({ backendPath: entry.backendPath, script: entry.script, device: name, usedPercent: used, state: 'grown', message: `${used}% used ≥ ${config.watch.thresholdPercent}%: lvextend to ${g.afterBytes} bytes` });
}

/** The shared thin pool, once per pass. */
async function watchPool(config: Config, run: Runner, log: Logger, report: WatchReport, users: string[]): Promise<void> {
  const u = await thinPoolUsage(run, config);
  if (!u) {
    const m = `thin pool is not running, but ${users.join(', ')} use it`;
    report.findings.push({ backendPath: users[0] ?? 'pool', script: 'block-thin', device: 'pool', state: 'error', message: m });
    return;
  }
  if (u.problem === 'Fail' || u.problem === 'Error' || u.problem === 'needs_check') {
    const m = `thin pool has failed (${u.problem}); growing cannot repair it. Its disks: ${users.join(', ')}`;
    report.findings.push({ backendPath: users[0] ?? 'pool', script: 'block-thin', device: 'pool', state: 'error', message: m });
    return;
  }
  // out of data space (writes are failing) or metadata full: grow, and the finding says so (logged once).
  let grew = false;
  if (u.dataPercent >= config.watch.thresholdPercent || u.problem === 'out of data space') {
    report.grown.push(await growThinPool('data', undefined, { config, run, log }, 'watch'));
    grew = true;
  }
  if (u.metadataPercent >= config.watch.thresholdPercent || (u.problem !== undefined && u.problem.startsWith('read-only'))) {
    report.grown.push(await growThinPool('metadata', undefined, { config, run, log }, 'watch'));
    grew = true;
  }
  report.findings.push({
    backendPath: users[0] ?? 'pool',
    script: 'block-thin',
    device: 'pool',
    usedPercent: Math.max(u.dataPercent, u.metadataPercent),
    state: u.problem ? 'full' : grew ? 'grown' : 'ok',
    message: u.problem
      ? `thin pool is ${u.problem} (data ${u.dataPercent}%, metadata ${u.metadataPercent}%); ${grew ? 'grown' : 'not grown'}. Disks: ${users.join(', ')}`
      : `pool data ${u.dataPercent}% metadata ${u.metadataPercent}%`,
  });
}

/** One pass over everything the journal knows. Never throws for one device: its error becomes a finding. */
export async function watchOnce(config: Config, run: Runner, log: Logger, opts: WatchOptions = {}): Promise<WatchReport> {
  const journal = opts.journal ?? new Journal(config.stateDir);
  const report: WatchReport = { checked: 0, grown: [], findings: [], problems: [], news: [], recovered: [] };
  const { entries, unreadable } = journal.list();
  for (const u of unreadable) {
    const m = `journal record ${u.file} cannot be read (${u.error}); its device is not watched`;
    report.findings.push({ backendPath: u.file, script: '?', device: '?', state: 'error', message: m });
  }
  const poolUsers: string[] = [];
  for (const entry of entries) {
    if (entry.phase !== 'ready') continue;
    if (entry.script === 'block-thin') {
      if (entry.steps.some((s) => s.kind === THIN_STEP.pool)) poolUsers.push(entry.backendPath);
      report.checked += 1;
      continue;
    }
    if (entry.script !== 'block-cow' && entry.script !== 'block-lvsnap') continue;
    report.checked += 1;
    const lock = await tryAcquireFlock(pathLockPath(config.stateDir, entry.backendPath), { runner: run }).catch(() => null);
    if (!lock) {
      report.findings.push({ backendPath: entry.backendPath, script: entry.script, device: '?', state: 'busy', message: 'its hook is running; looked at on the next pass' });
      continue;
    }
    try {
      const fresh = journal.load(entry.backendPath);
      if (!fresh || fresh.phase !== 'ready') continue;
      if (fresh.script === 'block-cow') await watchCow(fresh, config, run, log, report);
      else await watchLv(fresh, config, run, log, report);
    } catch (e) {
      const m = `${entry.backendPath}: ${msg(e)}`;
      report.findings.push({ backendPath: entry.backendPath, script: entry.script, device: '?', state: 'error', message: m });
    } finally {
      await lock.release();
    }
  }
  if (poolUsers.length) {
    try {
      await watchPool(config, run, log, report, poolUsers);
    } catch (e) {
      const m = `thin pool: ${msg(e)}`;
      report.findings.push({ backendPath: poolUsers[0] as string, script: 'block-thin', device: 'pool', state: 'error', message: m });
    }
  }
  report.problems = report.findings.filter((f) => isProblem(f.state));
  logFindings(report, log, opts.memory);
  return report;
}
