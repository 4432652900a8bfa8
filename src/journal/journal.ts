/**
 * What was built for each backend path, kept in `<stateDir>/journal/` (tmpfs: the devices it
 * describes are gone after a reboot too). One JSON file per backend path, replaced atomically
 * (write a temporary file, rename over) so a reader sees the old or the new record, never half.
 *
 * The rule that makes remove, a crash and gc agree: a step is written down *before* it is done
 * (`done: false`, with everything needed to find what it may have made), and marked done after.
 * Undo walks the steps backwards; every undoer is idempotent and also copes with a step that was
 * only intended, so the same record serves a clean remove, a remove after a SIGKILLed add, and
 * `xen-blockhooks gc` after xenstore forgot the device.
 */
import { linkSync, mkdirSync, readdirSync, readFileSync, renameSync, unlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { backendPathKey } from '../disk/request.js';
import type { DiskSpec } from '../disk/spec.js';
import { isStep, stepProblem, type StepData, type StepKind, type StepRecord } from './step-data.js';

export type { StepData, StepKind, StepRecord } from './step-data.js';
export { findStep, isStep } from './step-data.js';

export type Phase = 'adding' | 'ready' | 'removing' | 'failed' | 'held';

/** Whom a held record waits for: the saved domain, by uuid (and name, vdev, devid for people). */
export interface HeldFor {
  uuid: string;
  name: string | undefined;
  devid: string;
  /** The backend path the record had before it was held. */
  from: string;
  since: string;
  /** /proc/sys/kernel/random/boot_id when it was held: the devices live only as long as this boot. */
  bootId: string;
}

export interface JournalEntry {
  version: 1;
  /** The hook that built it, e.g. `block-cow`. */
  script: string;
  backendPath: string;
  phase: Phase;
  /** The process working on it; a dead pid in phase `adding` means a killed add. */
  pid: number;
  created: string;
  updated: string;
  disk: Pick<DiskSpec, 'params' | 'mode' | 'frontendId' | 'vdev' | 'domainName' | 'domainUuid'>;
  device?: { path: string; major: number; minor: number };
  /**
   * What of the guest's data lives only as long as this record's devices (a transient store,
   * overlay, volume or clone; Backend.transient), in a few words. Absent: everything the guest
   * writes outlives the devices (a persistent store, the image itself, a read-only disk).
   */
  transient?: string;
  /** Set while the record is held for a saved domain (src/hotplug/lifecycle.ts). */
  held?: HeldFor;
  /** Set on a record a restore adopted, until its guest has connected (lifecycle.ts). */
  restored?: { from: string; at: string };
  steps: StepRecord[];
}

/** `backend/vbd/5/51712` → `backend~vbd~5~51712.json` (`~` never occurs in xenstore paths). */
export function journalFileName(backendPath: string): string {
  return `${backendPathKey(backendPath)}.json`;
}

export class Journal {
  readonly dir: string;
  constructor(stateDir: string) {
    this.dir = join(stateDir, 'journal');
  }

  file(backendPath: string): string {
    return join(this.dir, journalFileName(backendPath));
  }

  load(backendPath: string): JournalEntry | undefined {
    return this.read(this.file(backendPath));
  }

  private read(file: string): JournalEntry | undefined {
    let text: string;
    try {
      text = readFileSync(file, 'utf8');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw e;
    }
    const entry = JSON.parse(text) as JournalEntry;
    if (entry.version !== 1 || !Array.isArray(entry.steps))
      throw new Error(`${file} is not a journal record this version understands`);
    // Each step as its kind's undoer will read it (step-data.ts): a record with a step that is not
    // is unreadable too, never half undone.
    (entry.steps as unknown[]).forEach((step, i) => {
      const why = stepProblem(step);
      if (why !== undefined)
        throw new Error(`${file} is not a journal record this version understands: step ${i + 1} ${why}`);
    });
    return entry;
  }

  save(entry: JournalEntry): void {
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    entry.updated = new Date().toISOString();
    const file = this.file(entry.backendPath);
    const tmp = `${file}.${process.pid}.tmp`;
    writeFileSync(tmp, `${JSON.stringify(entry, null, 1)}\n`, { mode: 0o600 });
    renameSync(tmp, file);
  }

  /**
   * Write `entry` only if no record has its key yet (a hard link of the written file: atomic, so
   * of two processes creating the same key one wins). False when a record is there already.
   */
  create(entry: JournalEntry): boolean {
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    entry.updated = new Date().toISOString();
    const file = this.file(entry.backendPath);
    const tmp = `${file}.${process.pid}.tmp`;
    writeFileSync(tmp, `${JSON.stringify(entry, null, 1)}\n`, { mode: 0o600 });
    try {
      linkSync(tmp, file);
      return true;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EEXIST') return false;
      throw e;
    } finally {
      unlinkSync(tmp);
    }
  }

  /**
   * Give `entry` another key (a record held for a saved domain, or adopted by its restore): the
   * record is written under `to` before the file of `from` goes, so a crash in between leaves the
   * record twice, never not at all.
   */
  move(entry: JournalEntry, from: string, to: string): void {
    entry.backendPath = to;
    this.save(entry);
    if (from !== to) this.delete(from);
  }

  delete(backendPath: string): void {
    // unlink, not rmSync: Node's rm loads its rimraf module on first use, for one file.
    try {
      unlinkSync(this.file(backendPath));
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    }
  }

  /** Every record, oldest first; unreadable files are reported, not skipped silently. */
  list(): { entries: JournalEntry[]; unreadable: { file: string; error: string }[] } {
    let names: string[];
    try {
      names = readdirSync(this.dir);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return { entries: [], unreadable: [] };
      throw e;
    }
    const entries: JournalEntry[] = [];
    const unreadable: { file: string; error: string }[] = [];
    for (const n of names.filter((n) => n.endsWith('.json')).sort()) {
      try {
        const e = this.read(join(this.dir, n));
        if (e) entries.push(e);
      } catch (err) {
        unreadable.push({ file: join(this.dir, n), error: (err as Error).message });
      }
    }
    entries.sort((a, b) => a.created.localeCompare(b.created));
    return { entries, unreadable };
  }

  /** A fresh record for an add about to start. */
  static begin(script: string, backendPath: string, disk: JournalEntry['disk']): JournalEntry {
    const now = new Date().toISOString();
    return {
      version: 1,
      script,
      backendPath,
      phase: 'adding',
      pid: process.pid,
      created: now,
      updated: now,
      disk,
      steps: [],
    };
  }
}

/**
 * The steps of `kind` in `entries` whose data has every value `match` gives, with their record;
 * records of `except` (a backend path: the asking disk's own) left out. One question asked in many
 * places: who else holds this loop, this snapshot, this thin id, this clone?
 */
export function stepsHolding<K extends StepKind>(
  entries: readonly JournalEntry[],
  kind: K,
  match: Partial<StepData<K>> = {},
  except?: string,
): { entry: JournalEntry; step: StepRecord<K> }[] {
  const out: { entry: JournalEntry; step: StepRecord<K> }[] = [];
  const wanted = Object.entries(match);
  for (const entry of entries) {
    if (entry.backendPath === except) continue;
    for (const step of entry.steps) {
      if (!isStep(step, kind)) continue;
      const data = step.data as unknown as Partial<Record<string, unknown>>;
      if (wanted.every(([k, v]) => data[k] === v)) out.push({ entry, step });
    }
  }
  return out;
}

/** The records (other than `except`'s) with a step of `kind` that matches (stepsHolding), each once. */
export function recordsHolding<K extends StepKind>(
  entries: readonly JournalEntry[],
  kind: K,
  match: Partial<StepData<K>> = {},
  except?: string,
): JournalEntry[] {
  return [...new Set(stepsHolding(entries, kind, match, except).map((h) => h.entry))];
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

/** True when `pid` names a live process (used to tell a killed add from one still running). */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}
