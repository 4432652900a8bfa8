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
import { Journal, type JournalEntry } from '../journal/journal.js';
import { tryAcquireFlock } from '../lock/flock.js';
import type { Logger } from '../log/logger.js';
import { pathLockPath } from '../lock/paths.js';
import { HOOKS, hookNamed } from '../backends/index.js';
import type { FindingState, GrowAction, WatchFinding, WatchOutcome } from '../backends/growth.js';

export type { FindingState, WatchFinding } from '../backends/growth.js';

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
  for (const f of report.news)
    log.error(`watch: ${f.message}`, f.state === 'invalid' ? { outcome: 'invalid' } : undefined);
  for (const r of report.recovered)
    log.info(
      `watch: ${r.finding.backendPath === r.finding.device ? r.finding.device : `${r.finding.device} (${r.finding.backendPath})`} recovered (was ${r.was}): ${r.finding.message}`,
    );
}

function msg(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

function take(report: WatchReport, o: WatchOutcome): void {
  report.findings.push(...o.findings);
  report.grown.push(...o.grown);
}

/** One pass over everything the journal knows. Never throws for one device: its error becomes a finding. */
export async function watchOnce(
  config: Config,
  run: Runner,
  log: Logger,
  opts: WatchOptions = {},
): Promise<WatchReport> {
  const journal = opts.journal ?? new Journal(config.stateDir);
  const report: WatchReport = { checked: 0, grown: [], findings: [], problems: [], news: [], recovered: [] };
  const { entries, unreadable } = journal.list();
  for (const u of unreadable) {
    const m = `journal record ${u.file} cannot be read (${u.error}); its device is not watched`;
    report.findings.push({ backendPath: u.file, script: '?', device: '?', state: 'error', message: m });
  }
  const deps = { config, run, log };
  const ready = entries.filter((e) => e.phase === 'ready');
  for (const entry of ready) {
    const hook = hookNamed(entry.script);
    if (!hook?.watch && !hook?.watchShared) continue;
    report.checked += 1;
    if (!hook.watch) continue;
    const lock = await tryAcquireFlock(pathLockPath(config.stateDir, entry.backendPath), { runner: run }).catch(
      () => null,
    );
    if (!lock) {
      report.findings.push({
        backendPath: entry.backendPath,
        script: entry.script,
        device: '?',
        state: 'busy',
        message: 'its hook is running; looked at on the next pass',
      });
      continue;
    }
    try {
      const fresh = journal.load(entry.backendPath);
      if (fresh && fresh.phase === 'ready') take(report, await hook.watch(fresh, deps));
    } catch (e) {
      report.findings.push({
        backendPath: entry.backendPath,
        script: entry.script,
        device: '?',
        state: 'error',
        message: `${entry.backendPath}: ${msg(e)}`,
      });
    } finally {
      await lock.release();
    }
  }
  // What disks share (block-thin's pool): once per pass, for the hook's ready records.
  for (const [script, hook] of Object.entries(HOOKS)) {
    if (!hook.watchShared) continue;
    const mine = ready.filter((e) => hookNamed(e.script) === hook);
    if (!mine.length) continue;
    try {
      take(report, await hook.watchShared(mine, deps));
    } catch (e) {
      report.findings.push({
        backendPath: (mine[0] as JournalEntry).backendPath,
        script,
        device: 'pool',
        state: 'error',
        message: `${script} shared pool: ${msg(e)}`,
      });
    }
  }
  report.problems = report.findings.filter((f) => isProblem(f.state));
  logFindings(report, log, opts.memory);
  return report;
}
